/* Continuous batching: many sequences on one model, one forward call per
 * step (iteration-level scheduling, as Orca and vLLM do).
 *
 * Each step runs, in one qs_model_forward, the next token of every sequence
 * that is decoding and chunks of the prompts still being read, at most
 * prefill_chunk prompt tokens in all, first come first served; then it
 * samples, with each sequence's own sampler, the sequences whose last token
 * ran. A sequence joins at the next step and leaves the step it ends, its
 * KV slot free for the next one.
 *
 * Every rank of the group holds the same table and runs the same steps with
 * the same adds and drops in the same order: the schedule is a function of
 * that table alone, and the logits are identical on every rank, so the
 * ranks agree on every token without talking about it.
 *
 * Within a step the tokens are ordered so that the ones whose logits are
 * needed come last (qs_model_forward returns a trailing range): the cache
 * takes every token's K and V before attention reads it, and attention
 * masks by position, so the order of tokens in a call changes nothing. */
#include "qs_shard.h"

#include <stdlib.h>
#include <string.h>

typedef struct seq {
    uint64_t id;
    int32_t *prompt;
    size_t n, done;   /* prompt tokens, and those already in the cache */
    size_t max_new;   /* tokens to sample at most */
    size_t generated; /* sampled so far */
    int32_t last;     /* the last sampled token (the next input) */
    int32_t eos;
    uint32_t slot;
    qs_sampler s;
} seq;

struct qs_batch {
    qs_model *m;
    uint32_t max_seqs, prefill_chunk, max_seq;
    seq *seqs; /* in admission order */
    size_t nseqs;
    uint8_t *slot_used;
    /* Per step, reused: the call's tokens and which sequence owns a logit row. */
    int32_t *tok;
    uint32_t *slot, *pos;
    size_t *rows, *take; /* logit row -> sequence; prompt tokens per sequence this step */
    float *logits;
    size_t cap_tokens;
};

int qs_batch_init(qs_model *m, const qs_batch_opts *o, qs_batch **out)
{
    *out = NULL;
    uint32_t slots = qs_model_slots(m);
    qs_batch *b = calloc(1, sizeof *b);
    if (!b)
        return qs_seterr(QS_ENOMEM, "out of memory for a batch");
    b->m = m;
    b->max_seqs = o && o->max_seqs && o->max_seqs < slots ? o->max_seqs : slots;
    b->prefill_chunk = o && o->prefill_chunk ? o->prefill_chunk : QS_BATCH_PREFILL_CHUNK;
    b->max_seq = qs_model_max_seq(m);
    b->cap_tokens = (size_t)b->max_seqs + b->prefill_chunk;
    size_t V = qs_model_cfg(m)->vocab;
    b->seqs = calloc(b->max_seqs, sizeof *b->seqs);
    b->slot_used = calloc(slots, 1);
    b->tok = malloc(b->cap_tokens * sizeof *b->tok);
    b->slot = malloc(b->cap_tokens * sizeof *b->slot);
    b->pos = malloc(b->cap_tokens * sizeof *b->pos);
    b->rows = malloc(b->max_seqs * sizeof *b->rows);
    b->take = malloc(b->max_seqs * sizeof *b->take);
    b->logits = malloc((size_t)b->max_seqs * V * sizeof *b->logits);
    if (!b->seqs || !b->slot_used || !b->tok || !b->slot || !b->pos || !b->rows || !b->take ||
        !b->logits) {
        qs_batch_close(b);
        return qs_seterr(QS_ENOMEM, "out of memory for a batch of %u sequences", b->max_seqs);
    }
    *out = b;
    return QS_OK;
}

void qs_batch_close(qs_batch *b)
{
    if (!b)
        return;
    for (size_t i = 0; i < b->nseqs; i++)
        free(b->seqs[i].prompt);
    free(b->seqs);
    free(b->slot_used);
    free(b->tok);
    free(b->slot);
    free(b->pos);
    free(b->rows);
    free(b->take);
    free(b->logits);
    free(b);
}

uint32_t qs_batch_running(const qs_batch *b)
{
    return b ? (uint32_t)b->nseqs : 0;
}

uint32_t qs_batch_capacity(const qs_batch *b)
{
    return b ? b->max_seqs : 0;
}

uint64_t qs_batch_kv_tokens(const qs_batch *b)
{
    uint64_t t = 0;
    for (size_t i = 0; b && i < b->nseqs; i++)
        t += b->seqs[i].done + (b->seqs[i].generated ? b->seqs[i].generated - 1 : 0);
    return t;
}

int qs_batch_add(qs_batch *b, uint64_t id, const int32_t *prompt, size_t n, size_t max_new,
                 const qs_sampler *s, int32_t eos)
{
    if (!b || !prompt || n == 0 || !s)
        return qs_seterr(QS_EINVAL, "a sequence needs a prompt of at least one token");
    if (n + (max_new ? max_new - 1 : 0) > b->max_seq)
        return qs_seterr(QS_EINVAL,
                         "%zu prompt tokens and %zu to generate do not fit the KV cache's "
                         "%u tokens per sequence: shorten the prompt, ask for fewer tokens, "
                         "or load the model with a larger max_seq",
                         n, max_new, b->max_seq);
    for (size_t i = 0; i < b->nseqs; i++)
        if (b->seqs[i].id == id)
            return qs_seterr(QS_EEXIST, "sequence %llu is already running", (unsigned long long)id);
    if (b->nseqs == b->max_seqs)
        return qs_seterr(QS_EBUSY,
                         "all %u sequences of the batch are running: wait for one "
                         "to end",
                         b->max_seqs);
    const qs_model_config *c = qs_model_cfg(b->m);
    for (size_t i = 0; i < n; i++)
        if (prompt[i] < 0 || (uint32_t)prompt[i] >= c->vocab)
            return qs_seterr(QS_EINVAL, "token id %d at %zu is outside the vocabulary of %u",
                             prompt[i], i, c->vocab);
    seq q = {.id = id, .n = n, .max_new = max_new, .eos = eos, .s = *s};
    if (!(q.prompt = malloc(n * sizeof *q.prompt)))
        return qs_seterr(QS_ENOMEM, "out of memory for a %zu-token prompt", n);
    memcpy(q.prompt, prompt, n * sizeof *prompt);
    while (b->slot_used[q.slot])
        q.slot++;
    b->slot_used[q.slot] = 1;
    b->seqs[b->nseqs++] = q;
    return QS_OK;
}

static void leave(qs_batch *b, size_t i)
{
    b->slot_used[b->seqs[i].slot] = 0;
    free(b->seqs[i].prompt);
    memmove(b->seqs + i, b->seqs + i + 1, (b->nseqs - i - 1) * sizeof *b->seqs);
    b->nseqs--;
}

int qs_batch_drop(qs_batch *b, uint64_t id)
{
    for (size_t i = 0; b && i < b->nseqs; i++)
        if (b->seqs[i].id == id) {
            leave(b, i);
            return QS_OK;
        }
    return qs_seterr(QS_ENOTFOUND, "no running sequence %llu", (unsigned long long)id);
}

void qs_batch_clear(qs_batch *b)
{
    while (b && b->nseqs)
        leave(b, b->nseqs - 1);
}

/* Appends one token of sequence q at position p to the call. */
static void put(qs_batch *b, size_t *n, int32_t t, const seq *q, size_t p)
{
    b->tok[*n] = t, b->slot[*n] = q->slot, b->pos[*n] = (uint32_t)p;
    (*n)++;
}

int qs_batch_step(qs_batch *b, qs_batch_event *ev, size_t cap, size_t *nev, qs_batch_stats *st)
{
    *nev = 0;
    if (st)
        memset(st, 0, sizeof *st);
    if (!b || b->nseqs == 0)
        return QS_OK;
    if (cap < b->nseqs)
        return qs_seterr(QS_EINVAL, "room for %zu events, but %zu sequences run", cap, b->nseqs);
    /* The prompt chunks: first come first served within the budget. A
     * chunk that ends its prompt yields a logit row, so that token goes
     * with the decode tokens at the end. */
    size_t *take = b->take, n = 0, budget = b->prefill_chunk;
    for (size_t i = 0; i < b->nseqs; i++) {
        seq *q = &b->seqs[i];
        size_t left = q->n - q->done;
        take[i] = left < budget ? left : budget;
        budget -= take[i];
        size_t quiet = take[i] && q->done + take[i] == q->n ? take[i] - 1 : take[i];
        for (size_t k = 0; k < quiet; k++)
            put(b, &n, q->prompt[q->done + k], q, q->done + k);
        if (st)
            st->prompt_tokens += take[i];
    }
    /* The logit rows, in admission order: decode tokens and prompt ends. */
    size_t nl = 0;
    for (size_t i = 0; i < b->nseqs; i++) {
        seq *q = &b->seqs[i];
        if (q->done == q->n) {
            put(b, &n, q->last, q, q->n + q->generated - 1);
            b->rows[nl++] = i;
            if (st)
                st->decode_tokens++;
        } else if (take[i] && q->done + take[i] == q->n) {
            put(b, &n, q->prompt[q->n - 1], q, q->n - 1);
            b->rows[nl++] = i;
        }
    }
    if (n == 0)
        return QS_OK;
    /* One sequence to sample (a lone stream): qs_model_next, which on a GPU
     * samples on the device and replays the decode step's CUDA graph, so
     * only the token comes back. Several: their logits, sampled here. */
    int32_t lone = -1;
    seq *q1 = nl == 1 ? &b->seqs[b->rows[0]] : NULL;
    int err = q1 && q1->max_new
                  ? qs_model_next(b->m, n, b->tok, b->slot, b->pos, &q1->s, &lone)
                  : qs_model_forward(b->m, n, b->tok, b->slot, b->pos, n - nl, b->logits);
    if (err)
        return err;
    for (size_t i = 0; i < b->nseqs; i++)
        b->seqs[i].done += take[i];
    /* Sample, then let the finished leave (from the back, so that the row
     * indices stay valid). */
    size_t V = qs_model_cfg(b->m)->vocab;
    for (size_t r = 0; r < nl; r++) {
        seq *q = &b->seqs[b->rows[r]];
        qs_batch_event *e = &ev[(*nev)++];
        e->id = q->id;
        e->first = q->generated == 0;
        if (q->max_new == 0) {
            e->token = -1, e->finish = QS_FINISH_LENGTH;
            continue;
        }
        e->token = q == q1 ? lone : qs_sample(&q->s, b->logits + r * V, V);
        q->last = e->token;
        q->generated++;
        e->finish = e->token == q->eos           ? QS_FINISH_EOS
                    : q->generated == q->max_new ? QS_FINISH_LENGTH
                                                 : QS_FINISH_NONE;
    }
    for (size_t r = nl; r-- > 0;)
        if (ev[r].finish != QS_FINISH_NONE)
            leave(b, b->rows[r]);
    if (st)
        st->tokens = n, st->sequences = nl;
    return QS_OK;
}
