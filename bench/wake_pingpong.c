// The cost of a wake-up on this machine (BENCHMARKS.md, "rr CPU: where a request's time goes").
// Two processes ping-pong 64 bytes over TCP loopback; each sleeps for readiness with a blocking
// recv (mode 0), epoll_wait (1) or an io_uring POLL_ADD submitted with io_uring_enter(GETEVENTS)
// (2), as glommio does; a multishot POLL_ADD armed once (3); or an IORING_OP_RECV that waits
// and receives in one (4). PIN_A / PIN_B pin the two sides to CPUs. Prints CPU per round trip.
//   cc -O2 -o /tmp/wake bench/wake_pingpong.c
//   perf stat -e context-switches,ipi:ipi_send_cpu /tmp/wake 2 100000
//   PIN_A=0 PIN_B=1 /tmp/wake 2 100000
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <time.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/socket.h>
#include <sys/epoll.h>
#include <sys/wait.h>
#include <sys/resource.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <linux/io_uring.h>
#include <stdatomic.h>
#include <sched.h>
struct ring { int fd; unsigned *sq_tail,*sq_mask,*sq_array,*cq_head,*cq_tail,*cq_mask; struct io_uring_sqe *sqes; struct io_uring_cqe *cqes; };
static void ring_init(struct ring *r, unsigned flags){ struct io_uring_params p; memset(&p,0,sizeof p); p.flags=flags;
 r->fd=syscall(__NR_io_uring_setup,8,&p); if(r->fd<0){perror("setup");exit(1);}
 size_t sqsz=p.sq_off.array+p.sq_entries*4, cqsz=p.cq_off.cqes+p.cq_entries*sizeof(struct io_uring_cqe);
 char*sq=mmap(0,sqsz,PROT_READ|PROT_WRITE,MAP_SHARED|MAP_POPULATE,r->fd,IORING_OFF_SQ_RING);
 char*cq=mmap(0,cqsz,PROT_READ|PROT_WRITE,MAP_SHARED|MAP_POPULATE,r->fd,IORING_OFF_CQ_RING);
 r->sqes=mmap(0,p.sq_entries*sizeof(struct io_uring_sqe),PROT_READ|PROT_WRITE,MAP_SHARED|MAP_POPULATE,r->fd,IORING_OFF_SQES);
 r->sq_tail=(unsigned*)(sq+p.sq_off.tail); r->sq_mask=(unsigned*)(sq+p.sq_off.ring_mask); r->sq_array=(unsigned*)(sq+p.sq_off.array);
 r->cq_head=(unsigned*)(cq+p.cq_off.head); r->cq_tail=(unsigned*)(cq+p.cq_off.tail); r->cq_mask=(unsigned*)(cq+p.cq_off.ring_mask); r->cqes=(struct io_uring_cqe*)(cq+p.cq_off.cqes);}
static void uring_wait(struct ring*r,int fd){ unsigned t=*r->sq_tail, i=t&*r->sq_mask; struct io_uring_sqe*s=&r->sqes[i]; memset(s,0,sizeof *s);
 s->opcode=IORING_OP_POLL_ADD; s->fd=fd; s->poll32_events=POLLIN; r->sq_array[i]=i; atomic_store_explicit((_Atomic unsigned*)r->sq_tail,t+1,memory_order_release);
 for(;;){ int n=syscall(__NR_io_uring_enter,r->fd,1,1,IORING_ENTER_GETEVENTS,0,0); if(n>=0)break; }
 unsigned h=*r->cq_head; while(h==atomic_load_explicit((_Atomic unsigned*)r->cq_tail,memory_order_acquire)) syscall(__NR_io_uring_enter,r->fd,0,1,IORING_ENTER_GETEVENTS,0,0);
 atomic_store_explicit((_Atomic unsigned*)r->cq_head,h+1,memory_order_release);}
// mode 3: the multishot poll is armed once; a wait only reaps its next completion.
static void uring_arm_multi(struct ring*r,int fd){ unsigned t=*r->sq_tail, i=t&*r->sq_mask; struct io_uring_sqe*s=&r->sqes[i]; memset(s,0,sizeof *s);
 s->opcode=IORING_OP_POLL_ADD; s->fd=fd; s->poll32_events=POLLIN; s->len=IORING_POLL_ADD_MULTI; r->sq_array[i]=i; atomic_store_explicit((_Atomic unsigned*)r->sq_tail,t+1,memory_order_release);
 syscall(__NR_io_uring_enter,r->fd,1,0,0,0,0);}
static void uring_reap(struct ring*r){ unsigned h=*r->cq_head; while(h==atomic_load_explicit((_Atomic unsigned*)r->cq_tail,memory_order_acquire)) syscall(__NR_io_uring_enter,r->fd,0,1,IORING_ENTER_GETEVENTS,0,0);
 atomic_store_explicit((_Atomic unsigned*)r->cq_head,h+1,memory_order_release);}
// mode 4: receive through the ring: one SQE that waits for data and copies it.
static int uring_recv(struct ring*r,int fd,char*buf,int len){ unsigned t=*r->sq_tail, i=t&*r->sq_mask; struct io_uring_sqe*s=&r->sqes[i]; memset(s,0,sizeof *s);
 s->opcode=IORING_OP_RECV; s->fd=fd; s->addr=(unsigned long)buf; s->len=len; r->sq_array[i]=i; atomic_store_explicit((_Atomic unsigned*)r->sq_tail,t+1,memory_order_release);
 for(;;){ int n=syscall(__NR_io_uring_enter,r->fd,1,1,IORING_ENTER_GETEVENTS,0,0); if(n>=0)break; }
 unsigned h=*r->cq_head; while(h==atomic_load_explicit((_Atomic unsigned*)r->cq_tail,memory_order_acquire)) syscall(__NR_io_uring_enter,r->fd,0,1,IORING_ENTER_GETEVENTS,0,0);
 int res=r->cqes[h&*r->cq_mask].res; atomic_store_explicit((_Atomic unsigned*)r->cq_head,h+1,memory_order_release); return res;}
static int mode; static unsigned rflags;
static void side(int fd,int first,int n){ char b[64]; memset(b,1,64); struct ring r; int ep=-1;
 if(mode==1){ep=epoll_create1(0); struct epoll_event e={.events=EPOLLIN,.data.fd=fd}; epoll_ctl(ep,EPOLL_CTL_ADD,fd,&e);}
 if(mode>=2) ring_init(&r,rflags);
 if(mode==3) uring_arm_multi(&r,fd);
 for(int i=0;i<n;i++){ if(first) send(fd,b,64,0);
  if(mode==4){ int got=0; while(got<64){int k=uring_recv(&r,fd,b+got,64-got); if(k<=0) return; got+=k;} if(!first) send(fd,b,64,0); continue; }
  if(mode==1){struct epoll_event e; epoll_wait(ep,&e,1,-1);} else if(mode==2) uring_wait(&r,fd); else if(mode==3) uring_reap(&r);
  int got=0; while(got<64){int k=recv(fd,b,64-got,mode?MSG_DONTWAIT:0); if(k>0)got+=k; else if(k==0) return; else if(mode==1){struct epoll_event e; epoll_wait(ep,&e,1,-1);} else if(mode==2) uring_wait(&r,fd); else if(mode==3) uring_reap(&r);}
  if(!first) send(fd,b,64,0);}}
int main(int argc,char**argv){ mode=atoi(argv[1]); int n=atoi(argv[2]); rflags=argc>3?strtoul(argv[3],0,0):0;
 int l=socket(AF_INET,SOCK_STREAM,0); struct sockaddr_in a={.sin_family=AF_INET,.sin_addr.s_addr=htonl(INADDR_LOOPBACK)}; socklen_t al=sizeof a;
 bind(l,(void*)&a,sizeof a); listen(l,1); getsockname(l,(void*)&a,&al); int c=socket(AF_INET,SOCK_STREAM,0); connect(c,(void*)&a,sizeof a); int s=accept(l,0,0);
 int one=1; setsockopt(c,IPPROTO_TCP,TCP_NODELAY,&one,4); setsockopt(s,IPPROTO_TCP,TCP_NODELAY,&one,4);
 struct timespec t0,t1; clock_gettime(CLOCK_MONOTONIC,&t0);
 char*pa=getenv("PIN_A"),*pb=getenv("PIN_B");
 if(fork()==0){ if(pb){cpu_set_t cs;CPU_ZERO(&cs);CPU_SET(atoi(pb),&cs);sched_setaffinity(0,sizeof cs,&cs);} side(s,0,n); _exit(0);} if(pa){cpu_set_t cs;CPU_ZERO(&cs);CPU_SET(atoi(pa),&cs);sched_setaffinity(0,sizeof cs,&cs);} side(c,1,n); wait(0); clock_gettime(CLOCK_MONOTONIC,&t1);
 struct rusage r1,r2; getrusage(RUSAGE_SELF,&r1); getrusage(RUSAGE_CHILDREN,&r2);
 double cpu=r1.ru_utime.tv_sec*1e6+r1.ru_utime.tv_usec+r1.ru_stime.tv_sec*1e6+r1.ru_stime.tv_usec+r2.ru_utime.tv_sec*1e6+r2.ru_utime.tv_usec+r2.ru_stime.tv_sec*1e6+r2.ru_stime.tv_usec;
 printf("mode %s flags 0x%x: wall %.2f us/rt, cpu %.2f us/rt\n", mode==0?"block":mode==1?"epoll":mode==2?"uring poll":mode==3?"uring multishot poll":"uring recv", rflags, ((t1.tv_sec-t0.tv_sec)*1e9+(t1.tv_nsec-t0.tv_nsec))/1e3/n, cpu/n);}
