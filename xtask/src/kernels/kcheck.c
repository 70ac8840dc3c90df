/* kcheck: the static client and proxy of `cargo xtask test-kernels`, run inside the VM.
 *   kcheck serve ADDR PORT TAG [UID]  accept forever (as UID); answer "TAG od=<SO_ORIGINAL_DST|->"
 *   kcheck conn ADDR PORT [UID]  connect (as UID), print "<answer> peer=<getpeername>"
 *   kcheck large                 large-buffer getsockopt results, one per line
 * Addresses are numeric; an address with ':' is IPv6 (v4-mapped included). */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define SO_ORIGINAL_DST 80

static socklen_t mkaddr(const char *a, int port, struct sockaddr_storage *ss) {
    memset(ss, 0, sizeof *ss);
    if (strchr(a, ':')) {
        struct sockaddr_in6 *s6 = (void *)ss;
        s6->sin6_family = AF_INET6;
        s6->sin6_port = htons(port);
        inet_pton(AF_INET6, a, &s6->sin6_addr);
        return sizeof *s6;
    }
    struct sockaddr_in *s4 = (void *)ss;
    s4->sin_family = AF_INET;
    s4->sin_port = htons(port);
    inet_pton(AF_INET, a, &s4->sin_addr);
    return sizeof *s4;
}

static void fmt(const struct sockaddr_storage *ss, char *out, size_t n) {
    char ip[INET6_ADDRSTRLEN] = "?";
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *s = (const void *)ss;
        inet_ntop(AF_INET, &s->sin_addr, ip, sizeof ip);
        snprintf(out, n, "%s:%d", ip, ntohs(s->sin_port));
    } else if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *s = (const void *)ss;
        inet_ntop(AF_INET6, &s->sin6_addr, ip, sizeof ip);
        snprintf(out, n, "[%s]:%d", ip, ntohs(s->sin6_port));
    } else {
        snprintf(out, n, "-");
    }
}

static int serve(const char *a, int port, const char *tag, int uid) {
    struct sockaddr_storage ss;
    socklen_t len = mkaddr(a, port, &ss);
    int fd = socket(ss.ss_family, SOCK_STREAM, 0), one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (ss.ss_family == AF_INET6) setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
    if (bind(fd, (void *)&ss, len) || listen(fd, 64)) { perror("serve"); return 1; }
    if (uid >= 0 && setuid(uid)) { perror("setuid"); return 1; }
    for (;;) {
        int c = accept(fd, NULL, NULL);
        if (c < 0) continue;
        struct sockaddr_storage od;
        socklen_t ol = sizeof od;
        char buf[128] = "-", line[200];
        memset(&od, 0, sizeof od);
        if (getsockopt(c, SOL_IP, SO_ORIGINAL_DST, &od, &ol) == 0 ||
            (ol = sizeof od, getsockopt(c, SOL_IPV6, SO_ORIGINAL_DST, &od, &ol) == 0))
            fmt(&od, buf, sizeof buf);
        int n = snprintf(line, sizeof line, "%s od=%s\n", tag, buf);
        if (write(c, line, n) < 0) perror("write");
        close(c);
    }
}

static int conn(const char *a, int port, int uid) {
    if (uid >= 0 && setuid(uid)) { perror("setuid"); return 1; }
    struct sockaddr_storage ss, peer;
    socklen_t len = mkaddr(a, port, &ss), pl = sizeof peer;
    int fd = socket(ss.ss_family, SOCK_STREAM, 0);
    if (connect(fd, (void *)&ss, len)) { printf("connect-error errno=%d\n", errno); return 1; }
    char buf[200] = {0}, p[128];
    getpeername(fd, (void *)&peer, &pl);
    fmt(&peer, p, sizeof p);
    ssize_t n = read(fd, buf, sizeof buf - 1);
    if (n > 0 && buf[n - 1] == '\n') buf[n - 1] = 0;
    printf("%s peer=%s\n", n > 0 ? buf : "no-answer", p);
    return 0;
}

/* rc, errno, optlen and a digest of what came back: must equal the run outside the tree. */
static void big(const char *what, int fd, int level, int name, size_t size) {
    unsigned char *b = malloc(size);
    memset(b, 0xAA, size);
    socklen_t l = size;
    int rc = getsockopt(fd, level, name, b, &l), e = rc ? errno : 0;
    unsigned long h = 0;
    for (size_t i = 0; i < size; i++) h = h * 31 + b[i];
    printf("%s rc=%d errno=%d optlen=%u digest=%lx\n", what, rc, e, l, h);
    free(b);
}

static int large(void) {
    int sv[2], t4 = socket(AF_INET, SOCK_STREAM, 0), t6 = socket(AF_INET6, SOCK_STREAM, 0);
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv)) { perror("socketpair"); return 1; }
    big("peergroups_unix_16k", sv[0], SOL_SOCKET, SO_PEERGROUPS, 16384);
    big("peergroups_tcp_16k", t4, SOL_SOCKET, SO_PEERGROUPS, 16384);
    big("unknown_sol_socket_16k", t4, SOL_SOCKET, 0x7fff, 16384);
    big("origdst4_8k", t4, SOL_IP, SO_ORIGINAL_DST, 8192);
    big("origdst6_8k", t6, SOL_IPV6, SO_ORIGINAL_DST, 8192);
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc >= 5 && !strcmp(argv[1], "serve"))
        return serve(argv[2], atoi(argv[3]), argv[4], argc > 5 ? atoi(argv[5]) : -1);
    if (argc >= 4 && !strcmp(argv[1], "conn")) return conn(argv[2], atoi(argv[3]), argc > 4 ? atoi(argv[4]) : -1);
    if (argc == 2 && !strcmp(argv[1], "large")) return large();
    fprintf(stderr, "usage: kcheck serve|conn|large ...\n");
    return 2;
}
