/* Rank coordination: rank 0 broadcasts commands, every rank runs them, the
 * replies are gathered back on rank 0.
 *
 * Wire: a fixed header of four int64 {opcode, payload length, group, seq}
 * (MPI_Ibcast), then the payload (the packed protobuf request), then each
 * rank's {error, length} (MPI_Igather) and its bytes (MPI_Igatherv): the reply
 * part on success, the error sentence on failure.
 *
 * Only the main thread of each rank calls MPI (MPI_THREAD_FUNNELED). All
 * collectives are non-blocking and completed by polling, so that (1) idle
 * ranks sleep instead of spinning a core in a blocking MPI_Bcast, and (2)
 * every wait has a deadline: an idle rank that hears nothing from rank 0 (not
 * even a heartbeat) for a while, or a rank 0 whose ranks do not answer a short
 * command, aborts the whole job instead of hanging.
 */
#define _POSIX_C_SOURCE 200809L
#include "qs_daemon.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <mpi.h>

enum { HDR_OP, HDR_LEN, HDR_GROUP, HDR_SEQ, HDR_N };

/* Largest payload a rank accepts from the header (a request, plus slack). */
#define MAX_PAYLOAD ((int64_t)QS_PROTO_MAX_MESSAGE + 4096)

static void sleep_s(double s)
{
    struct timespec ts = {.tv_sec = (time_t)s, .tv_nsec = (long)((s - (double)(time_t)s) * 1e9)};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

/* Completes r by polling: a few immediate tests, then sleeps that grow to
 * max_sleep (low latency for a busy daemon, near-zero CPU for an idle one).
 * timeout <= 0: no deadline. */
static int wait_req(MPI_Request *r, double timeout, double max_sleep, const char *what)
{
    double start = qs_now();
    double nap = 20e-6;
    for (int spins = 0;; spins++) {
        int done = 0;
        int rc = MPI_Test(r, &done, MPI_STATUS_IGNORE);
        if (rc != MPI_SUCCESS)
            return qs_seterr(QS_ECOMM, "MPI failed while %s (error %d)", what, rc);
        if (done)
            return QS_OK;
        if (timeout > 0 && qs_now() - start > timeout)
            return qs_seterr(QS_ECOMM, "no answer for %.0f s while %s", timeout, what);
        if (spins < 100)
            continue;
        sleep_s(nap);
        if (nap < max_sleep)
            nap *= 2;
    }
}

/* A collective that did not finish in time leaves the ranks out of step: the
 * only safe way on is to end the job, which mpirun then reports. */
static void die(qs_daemon *d, const char *why)
{
    qs_log(QS_LOG_ERROR, "%s; aborting all %d ranks so that the job does not hang", why, d->world);
    MPI_Abort(MPI_COMM_WORLD, 3);
    exit(3);
}

/* Every rank: runs one command and gathers the parts on rank 0. On rank 0,
 * job is the call to answer (NULL for an internal command). 1 when the
 * command's admit took the job over. */
static int execute(qs_daemon *d, const int64_t hdr[HDR_N], const void *payload, qs_job *job)
{
    int kept = 0;
    double t0 = qs_now();
    const qs_command *c = qs_command_for_op((uint32_t)hdr[HDR_OP]);
    qs_cmd cmd = {.op = (uint32_t)hdr[HDR_OP],
                  .group = (int32_t)hdr[HDR_GROUP],
                  .seq = (uint64_t)hdr[HDR_SEQ],
                  .job = job};
    qs_buf out = {0};
    int err;
    qs_clearerr();
    if (!c || !c->run) {
        err = qs_seterr(QS_EINTERNAL, "rank %d does not know opcode %lld", d->rank,
                        (long long)hdr[HDR_OP]);
    } else {
        cmd.req = protobuf_c_message_unpack(c->request, NULL, (size_t)hdr[HDR_LEN], payload);
        if (!cmd.req)
            err = qs_seterr(QS_EFORMAT, "rank %d could not unpack the %s request", d->rank,
                            c->method);
        else
            err = c->run(d, &cmd, &out);
    }
    const char *msg = err ? qs_errmsg() : NULL;
    const void *bytes = err ? (const void *)msg : out.data;
    size_t len = err ? strlen(msg) + 1 : out.len;
    if (len > (size_t)MAX_PAYLOAD) {
        err = qs_seterr(QS_EOVERFLOW, "rank %d's reply is too large (%zu bytes)", d->rank, len);
        msg = qs_errmsg();
        bytes = msg;
        len = strlen(msg) + 1;
    }

    /* Gather {err, len} then the bytes. */
    int mine[2] = {err, (int)len};
    int *heads = d->rank == 0 ? malloc(sizeof(int) * 2 * (size_t)d->world) : NULL;
    int *counts = d->rank == 0 ? malloc(sizeof(int) * (size_t)d->world) : NULL;
    int *displs = d->rank == 0 ? malloc(sizeof(int) * (size_t)d->world) : NULL;
    if (d->rank == 0 && (!heads || !counts || !displs))
        die(d, "out of memory gathering replies");
    double timeout = d->rank == 0 && c ? c->timeout : 0;
    MPI_Request r;
    MPI_Igather(mine, 2, MPI_INT, heads, 2, MPI_INT, 0, MPI_COMM_WORLD, &r);
    if (wait_req(&r, timeout, 1e-3, "gathering the ranks' replies") != QS_OK)
        die(d, qs_errmsg());
    char *all = NULL;
    size_t total = 0;
    if (d->rank == 0) {
        for (int i = 0; i < d->world; i++) {
            counts[i] = heads[2 * i + 1];
            displs[i] = (int)total;
            total += (size_t)counts[i];
            if (total > (size_t)INT32_MAX)
                die(d, "the ranks' replies exceed 2 GiB");
        }
        all = malloc(total ? total : 1);
        if (!all)
            die(d, "out of memory gathering replies");
    }
    MPI_Igatherv(bytes, (int)len, MPI_BYTE, all, counts, displs, MPI_BYTE, 0, MPI_COMM_WORLD, &r);
    if (wait_req(&r, timeout, 1e-3, "gathering the ranks' replies") != QS_OK)
        die(d, qs_errmsg());
    /* A rank's part of a gather is sent eagerly, so a rank with nothing to
     * do in a long command (a model served by other ranks) would be back in
     * its idle loop at once, and its watchdog would count rank 0's busy
     * time as silence. Hold every rank here until rank 0 has all parts. */
    MPI_Ibarrier(MPI_COMM_WORLD, &r);
    if (wait_req(&r, timeout, 1e-3, "waiting for the command to end on every rank") != QS_OK)
        die(d, qs_errmsg());
    free(out.data);

    if (d->rank == 0 && (job || (c && c->done))) {
        qs_part *parts = calloc((size_t)d->world, sizeof *parts);
        grpc_byte_buffer *reply = NULL;
        int first = -1;
        for (int i = 0; parts && i < d->world; i++) {
            parts[i].err = heads[2 * i];
            if (parts[i].err) {
                /* Never trust the terminator of bytes from another process. */
                if (counts[i] > 0)
                    all[displs[i] + counts[i] - 1] = '\0';
                parts[i].msg = counts[i] > 0 ? all + displs[i] : "";
                /* The rank that failed first says why; the others only
                 * followed it (QS_ECOMM: "another rank ..."). */
                if (first < 0 || (parts[first].err == QS_ECOMM && parts[i].err != QS_ECOMM))
                    first = i;
            } else {
                parts[i].data = all + displs[i];
                parts[i].len = (size_t)counts[i];
            }
        }
        double secs = qs_now() - t0;
        if (!job) {
            if (parts && cmd.req)
                c->done(d, &cmd, parts);
            else
                qs_log(QS_LOG_ERROR, "out of memory taking the ranks' parts of op %u", cmd.op);
        } else if (!parts) {
            qs_sink_finish(&job->sink, GRPC_STATUS_RESOURCE_EXHAUSTED,
                           "the daemon ran out of memory", NULL);
        } else if (first >= 0) {
            char sentence[512];
            if (first == 0 || d->world == 1)
                snprintf(sentence, sizeof sentence, "%s", parts[first].msg);
            else
                snprintf(sentence, sizeof sentence, "rank %d: %s", first, parts[first].msg);
            qs_sink_finish(&job->sink, qs_err_status(parts[first].err), sentence, NULL);
        } else if (c->admit) {
            qs_clearerr();
            kept = c->admit(d, &cmd, parts) == QS_OK;
        } else {
            qs_clearerr();
            int e = c->reply(d, &cmd, parts, secs, &reply);
            if (e)
                qs_sink_finish(&job->sink, qs_err_status(e), qs_errmsg(), reply);
            else
                qs_sink_finish(&job->sink, GRPC_STATUS_OK, NULL, reply);
        }
        free(parts);
    }
    if (cmd.req)
        protobuf_c_message_free_unpacked(cmd.req, NULL);
    free(all);
    free(heads);
    free(counts);
    free(displs);
    return kept;
}

/* ---- Non-zero ranks ------------------------------------------------------- */

int qs_ranks_follow(qs_daemon *d)
{
    /* Rank 0 beats every opts.heartbeat seconds when idle; missing several
     * in a row means it is gone or wedged. */
    double watchdog = d->opts.heartbeat * 10 > 5 ? d->opts.heartbeat * 10 : 5;
    for (;;) {
        int64_t hdr[HDR_N];
        MPI_Request r;
        MPI_Ibcast(hdr, HDR_N, MPI_INT64_T, 0, MPI_COMM_WORLD, &r);
        if (wait_req(&r, watchdog, 5e-3, "waiting for rank 0's next command") != QS_OK) {
            char why[256];
            snprintf(why, sizeof why, "rank 0 sent nothing, not even a heartbeat, for %.0f s",
                     watchdog);
            die(d, why);
        }
        /* Every header, heartbeats included, is numbered: a gap means the
         * ranks are out of step, and going on would mismatch collectives. */
        if (hdr[HDR_SEQ] != (int64_t)d->seq + 1) {
            char why[128];
            snprintf(why, sizeof why, "command %lld arrived after %llu: ranks out of step",
                     (long long)hdr[HDR_SEQ], (unsigned long long)d->seq);
            die(d, why);
        }
        d->seq = (uint64_t)hdr[HDR_SEQ];
        if (hdr[HDR_OP] == QS_OP_EXIT) {
            qs_log(QS_LOG_DEBUG, "exit from rank 0");
            return QS_OK;
        }
        if (hdr[HDR_OP] == QS_OP_HEARTBEAT)
            continue;
        if (hdr[HDR_LEN] < 0 || hdr[HDR_LEN] > MAX_PAYLOAD)
            die(d, "rank 0 announced a payload of impossible size");
        void *payload = malloc(hdr[HDR_LEN] ? (size_t)hdr[HDR_LEN] : 1);
        if (!payload)
            die(d, "out of memory receiving a command");
        MPI_Ibcast(payload, (int)hdr[HDR_LEN], MPI_BYTE, 0, MPI_COMM_WORLD, &r);
        if (wait_req(&r, 60, 1e-3, "receiving a command's payload") != QS_OK)
            die(d, qs_errmsg());
        qs_log(QS_LOG_DEBUG, "command %lld (op %lld, %lld bytes)", (long long)hdr[HDR_SEQ],
               (long long)hdr[HDR_OP], (long long)hdr[HDR_LEN]);
        execute(d, hdr, payload, NULL);
        free(payload);
    }
}

/* ---- Rank 0 --------------------------------------------------------------- */

static void send_header(qs_daemon *d, int64_t op, int64_t len)
{
    int64_t hdr[HDR_N] = {op, len, 0, (int64_t)++d->seq};
    MPI_Request r;
    MPI_Ibcast(hdr, HDR_N, MPI_INT64_T, 0, MPI_COMM_WORLD, &r);
    /* Between commands every rank waits for this header, so it completes at
     * once unless a rank is gone or wedged (its buffers fill up). */
    if (wait_req(&r, d->opts.rank_timeout, 1e-3, "broadcasting a command") != QS_OK)
        die(d, qs_errmsg());
}

void qs_ranks_run_job(qs_daemon *d, qs_job *job)
{
    if (qs_sink_cancelled(&job->sink)) {
        qs_sink_finish(&job->sink, GRPC_STATUS_CANCELLED,
                       "the client cancelled or its deadline passed before the command ran", NULL);
        qs_job_free(job);
        return;
    }
    qs_metrics_job(d->metrics, job, QS_JOB_RUNNING);
    int64_t hdr[HDR_N] = {job->command->op, (int64_t)job->len, 0, (int64_t)d->seq + 1};
    send_header(d, hdr[HDR_OP], hdr[HDR_LEN]);
    MPI_Request r;
    MPI_Ibcast(job->payload, (int)job->len, MPI_BYTE, 0, MPI_COMM_WORLD, &r);
    if (wait_req(&r, d->opts.rank_timeout, 1e-3, "broadcasting a command's payload") != QS_OK)
        die(d, qs_errmsg());
    if (execute(d, hdr, job->payload, job))
        return; /* the scheduler answers it */
    qs_metrics_job(d->metrics, job, QS_JOB_DONE);
    qs_job_free(job);
}

void qs_ranks_internal(qs_daemon *d, uint32_t op, const ProtobufCMessage *req)
{
    size_t len = 0;
    void *payload = qs_proto_pack_bytes(req, &len);
    if (!payload)
        die(d, "out of memory packing an internal command");
    send_header(d, op, (int64_t)len);
    int64_t hdr[HDR_N] = {op, (int64_t)len, 0, (int64_t)d->seq};
    MPI_Request r;
    MPI_Ibcast(payload, (int)len, MPI_BYTE, 0, MPI_COMM_WORLD, &r);
    if (wait_req(&r, d->opts.rank_timeout, 1e-3, "broadcasting a command's payload") != QS_OK)
        die(d, qs_errmsg());
    execute(d, hdr, payload, NULL);
    free(payload);
}

/* Waits until a job arrives or until deadline (monotonic seconds). */
static qs_job *pop_job(qs_daemon *d, double deadline)
{
    pthread_mutex_lock(&d->mu);
    while (!d->head) {
        double left = deadline - qs_now();
        if (left <= 0)
            break;
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        double end = (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9 + left;
        ts.tv_sec = (time_t)end;
        ts.tv_nsec = (long)((end - (double)ts.tv_sec) * 1e9);
        if (pthread_cond_timedwait(&d->cv, &d->mu, &ts) == ETIMEDOUT)
            break;
    }
    qs_job *job = d->head;
    if (job) {
        d->head = job->next;
        if (!d->head)
            d->tail = NULL;
    }
    pthread_mutex_unlock(&d->mu);
    return job;
}

int qs_daemon_enqueue(qs_daemon *d, qs_job *job)
{
    pthread_mutex_lock(&d->mu);
    if (d->queue_closed) {
        pthread_mutex_unlock(&d->mu);
        return qs_seterr(QS_EBUSY, "the daemon is shutting down");
    }
    job->next = NULL;
    if (d->tail)
        d->tail->next = job;
    else
        d->head = job;
    d->tail = job;
    pthread_cond_signal(&d->cv);
    pthread_mutex_unlock(&d->mu);
    return QS_OK;
}

void qs_job_free(qs_job *job)
{
    if (!job)
        return;
    qs_sink_finish(&job->sink, GRPC_STATUS_UNAVAILABLE,
                   "the daemon is shutting down: the request was not run", NULL);
    qs_sink_release(&job->sink);
    /* A job that never ran still leaves the waiting gauge. */
    if (job->state != QS_JOB_DONE)
        qs_metrics_job(NULL, job, QS_JOB_DONE);
    free(job->payload);
    free(job);
}

int qs_ranks_lead(qs_daemon *d)
{
    double last_beat = qs_now();
    double drain_start = 0;
    for (;;) {
        /* Wake at least every 100 ms to notice a signal. */
        double next = last_beat + d->opts.heartbeat;
        if (next > qs_now() + 0.1)
            next = qs_now() + 0.1;
        /* Generations running: take what is queued, then step them. */
        qs_job *job = pop_job(d, qs_sched_busy(d) ? 0 : next);
        if (qs_stop_signal && !qs_server_draining(d->server)) {
            qs_log(QS_LOG_INFO, "signal %d: shutting down", (int)qs_stop_signal);
            qs_server_drain(d->server);
        }
        if (job) {
            if (!qs_sched_take(d, job))
                qs_ranks_run_job(d, job);
            last_beat = qs_now();
        }
        if (qs_sched_busy(d)) {
            /* Past the drain's deadline what still runs is ended. */
            if (qs_server_draining(d->server) && qs_server_drain_expired(d->server))
                qs_sched_close(d, "the daemon is shutting down: the generation was ended at "
                                  "its drain timeout");
            qs_sched_lead(d);
            last_beat = qs_now();
            continue;
        }
        if (job)
            continue;
        if (qs_server_draining(d->server)) {
            if (!drain_start)
                drain_start = qs_now();
            /* Done once the servers have no request left: nothing can be
             * queued. The gRPC server cancels what is left at the drain
             * timeout; HTTP requests still queued then are refused below. */
            if (qs_server_wait(d->server, 0) &&
                (!d->http || qs_http_in_flight(d->http) == 0 || qs_server_drain_expired(d->server)))
                break;
            if (qs_now() - drain_start > d->opts.drain_timeout + 5) {
                qs_log(QS_LOG_ERROR, "the gRPC server did not stop; exiting anyway");
                break;
            }
        }
        if (qs_now() - last_beat >= d->opts.heartbeat) {
            send_header(d, QS_OP_HEARTBEAT, 0);
            last_beat = qs_now();
        }
    }
    /* Refuse whatever slipped in, then tell every rank to exit. */
    pthread_mutex_lock(&d->mu);
    d->queue_closed = 1;
    qs_job *rest = d->head;
    d->head = d->tail = NULL;
    pthread_mutex_unlock(&d->mu);
    while (rest) {
        qs_job *next = rest->next;
        qs_job_free(rest);
        rest = next;
    }
    qs_sched_close(d, "the daemon is shutting down");
    send_header(d, QS_OP_EXIT, 0);
    return QS_OK;
}
