// What relay_floor.c and bulk_floor.c share: TCP loopback listeners, dials and accepts that
// exit on failure, and a child's CPU from wait4's rusage. Header-only (static functions), so each
// program still builds with one `cc` command.
#ifndef JAUNT_BENCH_FLOOR_H
#define JAUNT_BENCH_FLOOR_H

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

static void die(const char *what) {
  perror(what);
  _exit(1);
}

// A listener on 127.0.0.1, port 0; its port in *port.
static int listener(unsigned short *port) {
  int l = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  socklen_t al = sizeof a;
  if (l < 0 || bind(l, (void *)&a, sizeof a) || listen(l, 4) || getsockname(l, (void *)&a, &al))
    die("listen");
  *port = ntohs(a.sin_port);
  return l;
}

static void set_nodelay(int fd) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

// A connection to 127.0.0.1:port (TCP_NODELAY when `nodelay`).
static int dial(unsigned short port, int nodelay) {
  int c = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port),
                          .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  if (c < 0 || connect(c, (void *)&a, sizeof a)) die("connect");
  if (nodelay) set_nodelay(c);
  return c;
}

// The one connection `l` will take (TCP_NODELAY when `nodelay`); closes `l`.
static int take(int l, int nodelay) {
  int s = accept(l, 0, 0);
  if (s < 0) die("accept");
  if (nodelay) set_nodelay(s);
  close(l);
  return s;
}

// User + system CPU in microseconds.
static long cpu_us(struct rusage *r) {
  return r->ru_utime.tv_sec * 1000000L + r->ru_utime.tv_usec + r->ru_stime.tv_sec * 1000000L +
         r->ru_stime.tv_usec;
}

#endif
