// The floor of bulk's CPU for any two-process relay chain on this machine (BENCHMARKS.md, "bulk:
// the floor of a two-process chain"), the bulk counterpart of relay_floor.c. A client sends MIB
// mebibytes through relay 1 and relay 2 (each its own process, like Jaunt's engine and agent, or
// nginx-2proc's two instances) to a sink; all TCP over loopback, one connection per hop.
// The relays do nothing but move bytes: no TLS, no framing, no parsing (mode 0: blocking recv +
// send; mode 1: epoll_wait + non-blocking recv + send, as nginx does), each read up to BUF bytes
// (default 262144, the size of Jaunt's stream window). Prints the relays' CPU (user + system,
// both processes, from wait4's rusage) per GiB, which is what `loadtest compare` counts for
// Jaunt (daemon + agent) and for the nginx chain (its workers). Client and sink are not counted.
// The TLS that a real chain adds on top (three AEAD passes per byte) is measured separately:
// `cargo bench -p jaunt-bench --bench records`.
//   cc -O2 -o /tmp/bulk_floor bench/bulk_floor.c
//   /tmp/bulk_floor 0 1024          # blocking relays, 1 GiB
//   /tmp/bulk_floor 1 1024 16384    # epoll relays, 16 KiB reads
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
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
static size_t bufsize = 262144;

// Waits until `fd` is ready for `events` (mode 1 only).
static void wait_for(int ep, int fd, unsigned events) {
  struct epoll_event want = {.events = events | EPOLLONESHOT, .data.fd = fd}, got;
  epoll_ctl(ep, EPOLL_CTL_MOD, fd, &want);
  while (epoll_wait(ep, &got, 1, -1) < 0 && errno == EINTR) {
  }
}

// Moves everything from `from` to `to` until `from` closes, then closes `to`.
static void relay(int from, int to) {
  char *b = malloc(bufsize);
  int ep = -1, flags = 0;
  if (!b) die("malloc");
  if (mode == 1) {
    ep = epoll_create1(0);
    struct epoll_event a = {.events = 0, .data.fd = from}, c = {.events = 0, .data.fd = to};
    epoll_ctl(ep, EPOLL_CTL_ADD, from, &a);
    epoll_ctl(ep, EPOLL_CTL_ADD, to, &c);
    flags = MSG_DONTWAIT;
  }
  for (;;) {
    ssize_t k = recv(from, b, bufsize, flags);
    if (k < 0 && errno == EAGAIN) {
      wait_for(ep, from, EPOLLIN);
      continue;
    }
    if (k <= 0) break;
    for (ssize_t sent = 0; sent < k;) {
      ssize_t w = send(to, b + sent, k - sent, flags);
      if (w < 0 && errno == EAGAIN) {
        wait_for(ep, to, EPOLLOUT);
        continue;
      }
      if (w <= 0) die("send");
      sent += w;
    }
  }
  close(to);
  _exit(0);
}

int main(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: bulk_floor MODE(0 blocking, 1 epoll) MIB [BUF]\n");
    return 2;
  }
  mode = atoi(argv[1]);
  long mib = atol(argv[2]);
  if (argc > 3) bufsize = (size_t)atol(argv[3]);
  if (mib <= 0 || bufsize == 0) {
    fprintf(stderr, "MIB and BUF must be positive\n");
    return 2;
  }
  unsigned short ps, p2, p1;
  int ls = listener(&ps), l2 = listener(&p2), l1 = listener(&p1);
  pid_t sink = fork();
  if (sink == 0) {
    int s = take(ls, 0);
    char *b = malloc(bufsize);
    long long total = 0;
    ssize_t k;
    if (!b) die("malloc");
    while ((k = recv(s, b, bufsize, 0)) > 0) total += k;
    _exit(total == mib * 1048576LL ? 0 : 3);
  }
  close(ls);
  pid_t r2 = fork();
  if (r2 == 0) {
    int down = take(l2, 0);
    relay(down, dial(ps, 0));
  }
  close(l2);
  pid_t r1 = fork();
  if (r1 == 0) {
    int down = take(l1, 0);
    relay(down, dial(p2, 0));
  }
  close(l1);
  int c = dial(p1, 0);
  char *b = malloc(bufsize);
  if (!b) die("malloc");
  memset(b, 7, bufsize);
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (long long left = mib * 1048576LL; left > 0;) {
    ssize_t w = send(c, b, left < (long long)bufsize ? (size_t)left : bufsize, 0);
    if (w <= 0) die("send");
    left -= w;
  }
  close(c);
  struct rusage ru1, ru2;
  int st;
  wait4(r1, &st, 0, &ru1);
  wait4(r2, &st, 0, &ru2);
  waitpid(sink, &st, 0);
  clock_gettime(CLOCK_MONOTONIC, &t1);
  if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
    fprintf(stderr, "the sink did not receive %ld MiB\n", mib);
    return 1;
  }
  double gib = mib / 1024.0;
  double wall = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
  printf("relays %s, %zu-byte reads: %.3f s CPU per GiB (relay 1 %.3f, relay 2 %.3f), %.0f MiB/s\n",
         mode ? "epoll" : "blocking", bufsize, (cpu_us(&ru1) + cpu_us(&ru2)) / 1e6 / gib,
         cpu_us(&ru1) / 1e6 / gib, cpu_us(&ru2) / 1e6 / gib, mib / wall);
  return 0;
}
