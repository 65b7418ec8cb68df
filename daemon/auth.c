/* Who may use the daemon: rank 0's TLS material and access token, read
 * from files (never from the command line, so the token is not in the
 * process list), and the check of a request's "authorization: Bearer"
 * value, for gRPC calls (server.c) and HTTP requests (http.c) alike. The
 * token is compared in constant time and never logged. */
#define _POSIX_C_SOURCE 200809L
#include "qs_daemon.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_PEM (1u << 20)

/* A credentials file: whole, not empty, at most max bytes. */
static int read_file(const char *opt, const char *path, size_t max, char **out)
{
    size_t n = 0;
    int err = qs_read_file(path, max, out, &n);
    if (err)
        return qs_seterr(err, "%s: %s", opt, qs_errmsg());
    if (n == 0) {
        free(*out);
        *out = NULL;
        return qs_seterr(QS_EINVAL, "%s %s: the file is empty", opt, path);
    }
    return QS_OK;
}

int qs_auth_load(qs_auth *a, const qs_daemon_opts *o)
{
    memset(a, 0, sizeof *a);
    int err = QS_OK;
    if (*o->tls_cert && !(err = read_file("--tls-cert", o->tls_cert, MAX_PEM, &a->cert_pem)))
        err = read_file("--tls-key", o->tls_key, MAX_PEM, &a->key_pem);
    if (!err && *o->tls_client_ca)
        err = read_file("--tls-client-ca", o->tls_client_ca, MAX_PEM, &a->client_ca_pem);
    if (!err && *o->token_file) {
        char *t = NULL;
        if (!(err = read_file("--token-file", o->token_file, 4096, &t))) {
            /* The token is the file's first line: 16 to 512 visible characters. */
            size_t n = strcspn(t, "\r\n");
            int visible = 1;
            for (size_t i = 0; i < n; i++)
                visible &= t[i] > ' ' && t[i] < 127;
            if (n < 16 || n > 512 || !visible)
                err = qs_seterr(QS_EINVAL,
                                "--token-file %s: the token (the file's first line) must be 16 "
                                "to 512 visible characters, e.g. from `openssl rand -hex 32`",
                                o->token_file);
            else
                snprintf(a->bearer, sizeof a->bearer, "Bearer %.*s", (int)n, t);
            memset(t, 0, strlen(t));
            free(t);
        }
    }
    if (err)
        qs_auth_close(a);
    return err;
}

void qs_auth_close(qs_auth *a)
{
    free(a->cert_pem);
    free(a->key_pem);
    free(a->client_ca_pem);
    memset(a, 0, sizeof *a); /* the token too */
}

const char *qs_auth_refusal(const qs_auth *a, const char *value, size_t len)
{
    if (!a->bearer[0])
        return NULL;
    if (!value || !len)
        return "this daemon needs an access token: give qctl --token-file FILE (or "
               "QSHARD_TOKEN_FILE), an HTTP client the header 'Authorization: Bearer TOKEN'";
    /* Constant time in the token: every byte of the expected value is read. */
    size_t n = strlen(a->bearer);
    unsigned char diff = (unsigned char)(len != n);
    for (size_t i = 0; i < n; i++)
        diff |= (unsigned char)(a->bearer[i] ^ (i < len ? value[i] : 0));
    return diff ? "the access token is wrong: give the one in the daemon's --token-file" : NULL;
}
