/* `qctl plan MODEL --svg FILE`: the planner's answer as a picture, in plain
 * SVG (no library): on the left the weight bytes of each scheme, on the
 * right the GPUs each needs against the size of one GPU, with the size
 * planned for (--device-memory) marked.
 */
#define _POSIX_C_SOURCE 200809L
#include "qs_ctl.h"
#include "qs_shard.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#define W        960
#define H        460
#define MAX_ROWS 8
#define MAX_TP   1024u

/* One colour per scheme, told apart in grey too (Tableau 10). */
static const char *const colours[MAX_ROWS] = {"#4e79a7", "#f28e2b", "#59a14f", "#e15759",
                                              "#76b7b2", "#edc948", "#b07aa1", "#9c755f"};

/* Sizes of GPUs people have: 16 (V100), 24 (A10, L4, RTX 4090), 40 and 80
 * (A100), 48 (L40S), 94 (H100 NVL), 141 (H200), 192 GiB (B200, MI300X). */
static const double sizes_gib[] = {16, 24, 40, 48, 80, 94, 141, 192};
#define NSIZES (sizeof sizes_gib / sizeof sizes_gib[0])

static double gib(uint64_t b)
{
    return (double)b / (double)(1ull << 30);
}

/* Text for an SVG element: the five XML specials escaped. */
static void text(FILE *f, const char *s)
{
    for (; *s; s++) {
        switch (*s) {
        case '<':
            fputs("&lt;", f);
            break;
        case '>':
            fputs("&gt;", f);
            break;
        case '&':
            fputs("&amp;", f);
            break;
        case '"':
            fputs("&quot;", f);
            break;
        case '\'':
            fputs("&apos;", f);
            break;
        default:
            fputc(*s, f);
        }
    }
}

/* A tick step of 1, 2 or 5 times a power of ten, giving about n ticks. */
static double nice_step(double max, int n)
{
    double raw = max / n, p = pow(10, floor(log10(raw)));
    double m = raw / p;
    return (m <= 1 ? 1 : m <= 2 ? 2 : m <= 5 ? 5 : 10) * p;
}

int qs_ctl_plan_svg(const char *path, const qs_model_config *m, const qs_quant *rows,
                    const char *const *labels, size_t n, const qs_workload *w, uint64_t dev)
{
    if (n == 0 || n > MAX_ROWS)
        return qs_seterr(QS_EINVAL, "the chart takes 1 to %d schemes", MAX_ROWS);
    /* The sizes on the x axis: the common ones and the one planned for. */
    double xs[NSIZES + 1];
    size_t nx = 0;
    double planned = gib(dev);
    int placed = 0;
    for (size_t i = 0; i < NSIZES; i++) {
        if (!placed && fabs(sizes_gib[i] - planned) < 0.5)
            placed = 1;
        else if (!placed && planned < sizes_gib[i]) {
            xs[nx++] = planned;
            placed = 1;
        }
        xs[nx++] = sizes_gib[i];
    }
    if (!placed)
        xs[nx++] = planned;
    uint64_t weights[MAX_ROWS];
    uint32_t need[MAX_ROWS][NSIZES + 1];
    uint32_t ymax = 1;
    double wmax = 0;
    for (size_t r = 0; r < n; r++) {
        qs_plan p;
        int err = qs_plan_make(m, &rows[r], 1, w, &p);
        if (err)
            return err;
        weights[r] = p.weight_bytes;
        if (gib(p.weight_bytes) > wmax)
            wmax = gib(p.weight_bytes);
        for (size_t i = 0; i < nx; i++) {
            qs_min_gpus mg = {0, 0};
            uint64_t bytes = (uint64_t)(xs[i] * (double)(1ull << 30));
            if ((err = qs_plan_min_gpus(m, &rows[r], w, bytes, MAX_TP, &mg)))
                return err;
            need[r][i] = mg.valid_tp;
            if (mg.valid_tp > ymax)
                ymax = mg.valid_tp;
        }
    }

    FILE *f = strcmp(path, "-") ? fopen(path, "w") : stdout;
    if (!f)
        return qs_seterr(QS_EIO, "cannot write '%s': %s", path, strerror(errno));
    fprintf(f,
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" "
            "viewBox=\"0 0 %d %d\" font-family=\"DejaVu Sans, Arial, sans-serif\" "
            "font-size=\"13\">\n"
            "<rect width=\"%d\" height=\"%d\" fill=\"white\"/>\n",
            W, H, W, H, W, H);
    fputs("<text x=\"20\" y=\"28\" font-size=\"18\" font-weight=\"bold\">", f);
    text(f, m->name);
    fputs(": weights and GPUs needed, by scheme</text>\n", f);
    fprintf(f,
            "<text x=\"20\" y=\"48\" fill=\"#555\">Per GPU: its share of the weights, a KV "
            "cache for %u x %u tokens, the workspace and a %.1f GiB reserve.</text>\n"
            "<text x=\"20\" y=\"66\" fill=\"#555\">GPUs: the fewest that hold it and split "
            "it validly (tensor parallel). The dashed line is the size planned for.</text>\n",
            w->batch, w->seq, gib(w->reserve));

    /* Left: weight bytes, one bar per scheme. */
    const double lx = 150, lw = 250, ly = 110, bh = 28, gap = 14;
    double step = nice_step(wmax, 4), top = ceil(wmax / step) * step;
    if (top <= 0)
        top = 1;
    fprintf(f, "<text x=\"%g\" y=\"98\" font-weight=\"bold\">Weights (GiB)</text>\n", lx);
    double lbottom = ly + (double)n * (bh + gap);
    for (double t = 0; t <= top + step / 2; t += step) {
        double x = lx + lw * t / top;
        fprintf(f,
                "<line x1=\"%.1f\" y1=\"%g\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#ddd\"/>\n"
                "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\" fill=\"#555\">%g</text>\n",
                x, ly - 4, x, lbottom, x, lbottom + 16, t);
    }
    for (size_t r = 0; r < n; r++) {
        double y = ly + (double)r * (bh + gap);
        double bw = lw * gib(weights[r]) / top;
        fprintf(f, "<text x=\"%g\" y=\"%.1f\" text-anchor=\"end\">", lx - 8, y + bh / 2 + 5);
        text(f, labels[r]);
        fprintf(f,
                "</text>\n<rect x=\"%g\" y=\"%.1f\" width=\"%.1f\" height=\"%g\" fill=\"%s\"/>\n"
                "<text x=\"%.1f\" y=\"%.1f\">%.1f</text>\n",
                lx, y, bw, bh, colours[r], lx + bw + 4, y + bh / 2 + 5, gib(weights[r]));
    }

    /* Right: GPUs needed against GPU size, log2 axis. */
    const double rx = 520, rw = 400, ry = 110, rh = 250;
    uint32_t ytop = 1;
    while (ytop < ymax)
        ytop *= 2;
    double ly2 = log2((double)ytop);
    if (ly2 < 1)
        ly2 = 1;
    fprintf(f,
            "<text x=\"%g\" y=\"98\" font-weight=\"bold\">GPUs needed against GPU memory "
            "(GiB)</text>\n",
            rx);
#define YPOS(g) (ry + rh - rh * log2((double)(g)) / ly2)
#define XPOS(i) (rx + (nx > 1 ? rw * (double)(i) / (double)(nx - 1) : rw / 2))
    for (uint32_t g = 1; g <= ytop; g *= 2) {
        fprintf(f,
                "<line x1=\"%g\" y1=\"%.1f\" x2=\"%g\" y2=\"%.1f\" stroke=\"#ddd\"/>\n"
                "<text x=\"%g\" y=\"%.1f\" text-anchor=\"end\" fill=\"#555\">%u</text>\n",
                rx, YPOS(g), rx + rw, YPOS(g), rx - 8, YPOS(g) + 4, g);
    }
    for (size_t i = 0; i < nx; i++) {
        int mine = fabs(xs[i] - planned) < 0.5;
        fprintf(f,
                "<line x1=\"%.1f\" y1=\"%g\" x2=\"%.1f\" y2=\"%g\" stroke=\"%s\"%s/>\n"
                "<text x=\"%.1f\" y=\"%g\" text-anchor=\"middle\" fill=\"%s\"%s>%g</text>\n",
                XPOS(i), ry, XPOS(i), ry + rh, mine ? "#333" : "#eee",
                mine ? " stroke-dasharray=\"4 3\"" : "", XPOS(i), ry + rh + 18,
                mine ? "#000" : "#555", mine ? " font-weight=\"bold\"" : "", xs[i]);
    }
    for (size_t r = 0; r < n; r++) {
        /* A line through the sizes that fit at all; none past MAX_TP. */
        fprintf(f, "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"2.5\" points=\"",
                colours[r]);
        for (size_t i = 0; i < nx; i++)
            if (need[r][i])
                fprintf(f, "%.1f,%.1f ", XPOS(i), YPOS(need[r][i]));
        fputs("\"/>\n", f);
        for (size_t i = 0; i < nx; i++)
            if (need[r][i])
                fprintf(f, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"4\" fill=\"%s\"/>\n", XPOS(i),
                        YPOS(need[r][i]), colours[r]);
    }
    /* The legend, with the count at the size planned for. */
    for (size_t r = 0; r < n; r++) {
        double y = ry + rh + 48 + (double)(r / 2) * 18, x = rx + (double)(r % 2) * 210;
        uint32_t at = 0;
        for (size_t i = 0; i < nx; i++)
            if (fabs(xs[i] - planned) < 0.5)
                at = need[r][i];
        fprintf(f, "<rect x=\"%.1f\" y=\"%.1f\" width=\"12\" height=\"12\" fill=\"%s\"/>\n", x,
                y - 10, colours[r]);
        fprintf(f, "<text x=\"%.1f\" y=\"%.1f\">", x + 18, y);
        text(f, labels[r]);
        if (at)
            fprintf(f, ": %u x %g GiB</text>\n", at, planned);
        else
            fprintf(f, ": does not fit %g GiB GPUs</text>\n", planned);
    }
#undef YPOS
#undef XPOS
    fputs("</svg>\n", f);
    int bad = ferror(f);
    if (f != stdout)
        bad |= fclose(f) != 0;
    else
        bad |= fflush(f) != 0;
    if (bad)
        return qs_seterr(QS_EIO, "cannot write '%s': %s", path, strerror(errno));
    return QS_OK;
}
