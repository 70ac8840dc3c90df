/* kcheck: the static client and proxy of `cargo xtask test-kernels`, run inside the VM.
 *   kcheck serve ADDR PORT TAG [UID]  accept forever (as UID); answer "TAG od=<SO_ORIGINAL_DST|->"
 *   kcheck conn ADDR PORT [UID]  connect (as UID), print "<answer> peer=<getpeername>"
 *   kcheck iserve ADDR PORT TAG [UID]  the same, answering "TAG local=<getsockname> od=..." (inbound)
 *   kcheck userve ADDR PORT TAG  UDP: answer every datagram with "TAG" (a DNS server or listener)
 *   kcheck udp ADDR PORT [UID] [connected]  one datagram; print "<answer> from=<recvmsg source>",
 *                                 or "<answer> peer=<getpeername>" on a connected socket
 *   kcheck large                 large-buffer getsockopt results, one per line
 *   kcheck links                 "netns=N": the BPF links of type netns (sk_lookup) on the system
 * Addresses are numeric; an address with ':' is IPv6 (v4-mapped included). */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/bpf.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/time.h>
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

/* The original destination the getsockopt program answers, at the level of the socket's family. */
static void origdst(int c, char *buf, size_t n) {
    struct sockaddr_storage od, me;
    socklen_t ol = sizeof od, ml = sizeof me;
    memset(&od, 0, sizeof od);
    getsockname(c, (void *)&me, &ml);
    int level = me.ss_family == AF_INET6 ? SOL_IPV6 : SOL_IP;
    if (getsockopt(c, level, SO_ORIGINAL_DST, &od, &ol) == 0) fmt(&od, buf, n);
}

static int serve(const char *a, int port, const char *tag, int uid, int show_local) {
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
        char buf[128] = "-", line[300];
        memset(&od, 0, sizeof od);
        int n;
        if (show_local) {
            char local[128];
            struct sockaddr_storage me;
            socklen_t ml = sizeof me;
            getsockname(c, (void *)&me, &ml);
            fmt(&me, local, sizeof local);
            origdst(c, buf, sizeof buf);
            n = snprintf(line, sizeof line, "%s local=%s od=%s\n", tag, local, buf);
        } else {
            if (getsockopt(c, SOL_IP, SO_ORIGINAL_DST, &od, &ol) == 0 ||
                (ol = sizeof od, getsockopt(c, SOL_IPV6, SO_ORIGINAL_DST, &od, &ol) == 0))
                fmt(&od, buf, sizeof buf);
            n = snprintf(line, sizeof line, "%s od=%s\n", tag, buf);
        }
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

static int userve(const char *a, int port, const char *tag) {
    struct sockaddr_storage ss, from;
    socklen_t len = mkaddr(a, port, &ss);
    int fd = socket(ss.ss_family, SOCK_DGRAM, 0), one = 1;
    if (ss.ss_family == AF_INET6) setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
    if (bind(fd, (void *)&ss, len)) { perror("userve"); return 1; }
    for (;;) {
        char buf[512];
        socklen_t fl = sizeof from;
        if (recvfrom(fd, buf, sizeof buf, 0, (void *)&from, &fl) < 0) continue;
        if (sendto(fd, tag, strlen(tag), 0, (void *)&from, fl) < 0) perror("sendto");
    }
}

static int udp(const char *a, int port, int uid, int connected) {
    if (uid >= 0 && setuid(uid)) { perror("setuid"); return 1; }
    struct sockaddr_storage ss, src;
    socklen_t len = mkaddr(a, port, &ss);
    int fd = socket(ss.ss_family, SOCK_DGRAM, 0);
    struct timeval tv = {3, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    char buf[200] = {0}, where[128];
    const char *how = "from";
    if (connected) {
        if (connect(fd, (void *)&ss, len)) { printf("connect-error errno=%d\n", errno); return 1; }
        if (send(fd, "q", 1, 0) < 0) { printf("send-error errno=%d\n", errno); return 1; }
    } else if (sendto(fd, "q", 1, 0, (void *)&ss, len) < 0) {
        printf("send-error errno=%d\n", errno);
        return 1;
    }
    /* recvmsg: its msg_name is what the recvmsg program rewrites. */
    memset(&src, 0, sizeof src);
    struct iovec iov = {buf, sizeof buf - 1};
    struct msghdr m = {.msg_name = &src, .msg_namelen = sizeof src, .msg_iov = &iov, .msg_iovlen = 1};
    ssize_t n = recvmsg(fd, &m, 0);
    if (connected) {
        socklen_t pl = sizeof src;
        how = "peer";
        getpeername(fd, (void *)&src, &pl);
    }
    fmt(&src, where, sizeof where);
    printf("%s %s=%s\n", n > 0 ? buf : "no-answer", how, where);
    return 0;
}

/* The BPF links of type netns (sk_lookup) that exist, by walking the link ids. */
static int links(void) {
    union bpf_attr at;
    unsigned id = 0, netns = 0;
    for (;;) {
        memset(&at, 0, sizeof at);
        at.start_id = id;
        if (syscall(SYS_bpf, BPF_LINK_GET_NEXT_ID, &at, sizeof at)) break;
        id = at.next_id;
        memset(&at, 0, sizeof at);
        at.link_id = id;
        int fd = syscall(SYS_bpf, BPF_LINK_GET_FD_BY_ID, &at, sizeof at);
        if (fd < 0) continue;
        struct bpf_link_info info;
        memset(&info, 0, sizeof info);
        memset(&at, 0, sizeof at);
        at.info.bpf_fd = fd;
        at.info.info_len = sizeof info;
        at.info.info = (unsigned long)&info;
        if (syscall(SYS_bpf, BPF_OBJ_GET_INFO_BY_FD, &at, sizeof at) == 0 && info.type == BPF_LINK_TYPE_NETNS)
            netns++;
        close(fd);
    }
    printf("netns=%u\n", netns);
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
    if (argc >= 5 && (!strcmp(argv[1], "serve") || !strcmp(argv[1], "iserve")))
        return serve(argv[2], atoi(argv[3]), argv[4], argc > 5 ? atoi(argv[5]) : -1, argv[1][0] == 'i');
    if (argc == 5 && !strcmp(argv[1], "userve")) return userve(argv[2], atoi(argv[3]), argv[4]);
    if (argc >= 4 && !strcmp(argv[1], "udp"))
        return udp(argv[2], atoi(argv[3]), argc > 4 ? atoi(argv[4]) : -1, argc > 5 && !strcmp(argv[5], "connected"));
    if (argc == 2 && !strcmp(argv[1], "links")) return links();
    if (argc >= 4 && !strcmp(argv[1], "conn")) return conn(argv[2], atoi(argv[3]), argc > 4 ? atoi(argv[4]) : -1);
    if (argc == 2 && !strcmp(argv[1], "large")) return large();
    fprintf(stderr, "usage: kcheck serve|iserve|userve|conn|udp|large|links ...\n");
    return 2;
}
