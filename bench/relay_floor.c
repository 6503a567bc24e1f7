// The floor of rr's CPU for any two-process relay chain on this machine (BENCHMARKS.md, "rr: the
// floor of a two-process chain"). A client sends 64 bytes and waits for the echo, through relay
// 1 and relay 2 (each its own process, like Jaunt's engine and agent, or nginx-2proc's two
// instances), to an echo server; all TCP over loopback, NODELAY, one connection per hop.
// The relays do nothing but move bytes: no TLS, no parsing, the fewest system calls a readiness
// model allows (mode 0: blocking recv + send, 4 system calls per relay per request; mode 1:
// epoll_wait + non-blocking recv + send, as nginx does). Prints the relays' CPU (user + system,
// both processes, from wait4's rusage) per request, which is what `loadtest compare` counts for
// Jaunt (daemon + agent) and for the nginx chain (its workers). Client and echo are not counted.
//   cc -O2 -o /tmp/relay_floor bench/relay_floor.c
//   /tmp/relay_floor 0 60000     # blocking relays
//   /tmp/relay_floor 1 60000     # epoll relays
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "floor.h"

static int mode;

// Moves exactly 64 bytes from `from` to `to`; 0 when `from` closed.
static int hop(int ep, int from, int to) {
  char b[64];
  int got = 0;
  while (got < 64) {
    if (mode == 1) {
      struct epoll_event e;
      int k = recv(from, b + got, 64 - got, MSG_DONTWAIT);
      if (k > 0) { got += k; continue; }
      if (k == 0) return 0;
      // The first recv of a request finds nothing (the peer has not sent yet), as in nginx:
      // sleep, then read. Re-arm with EPOLL_CTL_MOD so only `from` wakes us.
      struct epoll_event want = {.events = EPOLLIN | EPOLLONESHOT, .data.fd = from};
      epoll_ctl(ep, EPOLL_CTL_MOD, from, &want);
      epoll_wait(ep, &e, 1, -1);
    } else {
      int k = recv(from, b + got, 64 - got, 0);
      if (k <= 0) return 0;
      got += k;
    }
  }
  return send(to, b, 64, 0) == 64;
}

static void relay(int down, int up) {
  int ep = -1;
  if (mode == 1) {
    ep = epoll_create1(0);
    struct epoll_event a = {.events = 0, .data.fd = down}, b = {.events = 0, .data.fd = up};
    epoll_ctl(ep, EPOLL_CTL_ADD, down, &a);
    epoll_ctl(ep, EPOLL_CTL_ADD, up, &b);
  }
  while (hop(ep, down, up) && hop(ep, up, down)) {
  }
  _exit(0);
}

int main(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: relay_floor MODE(0 blocking, 1 epoll) REQUESTS\n");
    return 2;
  }
  mode = atoi(argv[1]);
  int n = atoi(argv[2]);
  unsigned short pe, p2, p1;
  int le = listener(&pe), l2 = listener(&p2), l1 = listener(&p1);
  pid_t echo = fork();
  if (echo == 0) {
    int s = take(le, 1);
    char b[64];
    for (;;) {
      int got = 0;
      while (got < 64) {
        int k = recv(s, b + got, 64 - got, 0);
        if (k <= 0) _exit(0);
        got += k;
      }
      if (send(s, b, 64, 0) != 64) _exit(0);
    }
  }
  close(le);
  pid_t r2 = fork();
  if (r2 == 0) {
    int down = take(l2, 1);
    relay(down, dial(pe, 1));
  }
  close(l2);
  pid_t r1 = fork();
  if (r1 == 0) {
    int down = take(l1, 1);
    relay(down, dial(p2, 1));
  }
  close(l1);
  int c = dial(p1, 1);
  char b[64];
  memset(b, 7, sizeof b);
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (int i = 0; i < n; i++) {
    if (send(c, b, 64, 0) != 64) die("send");
    int got = 0;
    while (got < 64) {
      int k = recv(c, b + got, 64 - got, 0);
      if (k <= 0) die("recv");
      got += k;
    }
  }
  clock_gettime(CLOCK_MONOTONIC, &t1);
  close(c);
  struct rusage ru1, ru2;
  int st;
  wait4(r1, &st, 0, &ru1);
  wait4(r2, &st, 0, &ru2);
  waitpid(echo, &st, 0);
  double wall = ((t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)) / 1e3 / n;
  printf("relays %s: %.1f us CPU per request (relay 1 %.1f, relay 2 %.1f), %.1f us wall per "
         "request, %.0f requests/s\n",
         mode ? "epoll" : "blocking", (double)(cpu_us(&ru1) + cpu_us(&ru2)) / n,
         (double)cpu_us(&ru1) / n, (double)cpu_us(&ru2) / n, wall, 1e6 / wall);
  return 0;
}
