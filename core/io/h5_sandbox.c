/* The reader process behind fl_h5_open_untrusted.
 *
 * Why a process: libhdf5 1.10 crashes (H5F__accum_read after a failed call on the same handle),
 * hangs (H5T__conv_vlen on a variable-length attribute) and frees invalid pointers (H5Aiterate2)
 * on crafted files, and its state is global. No check of ours before or around the library can
 * contain that; an address space can. So a file flowerlua did not write is parsed in a child
 * process started at open (the program re-executed, see reader_entry; else forked), as browsers
 * isolate image and font parsers:
 *   - the child opens the file, then closes every other descriptor (stdio goes to /dev/null),
 *     sets RLIMIT_AS (memory), RLIMIT_CPU, RLIMIT_FSIZE = 0 and RLIMIT_CORE = 0, leaves the
 *     terminal's process group (Ctrl-C is for the parent), dies with the parent, and on Linux
 *     installs a seccomp filter: no open, no fork/exec, no kill; read, write, memory, exit;
 *   - it answers one request at a time over a socketpair with plain values: status, strings,
 *     integers, doubles, shapes, and array bytes in blocks of 16 MiB through a shared mapping
 *     (so the child never holds a whole array, and the parent copies each block out once);
 *   - the parent checks every answer's structure (counts, lengths, ranks, dtypes, sizes against
 *     what it asked for), waits at most timeout_s for each part of an answer, and when the
 *     child dies, stalls or sends something malformed, kills it and fails the call naming the
 *     file, the object and what happened. The handle then fails every later call.
 * Array contents and strings are data: they come back as bytes, as an in-process read would give
 * them. Files opened with fl_h5_open (flowerlua's own) stay in-process. */
#include "h5_sandbox.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <link.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#ifdef __linux__
#include <stddef.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#endif

#if defined(__SANITIZE_ADDRESS__)
#define UNDER_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define UNDER_ASAN 1
#endif
#endif

/* requests beyond the string lists of h5_sandbox.h */
enum { OP_KIND = 10, OP_INFO, OP_ROWS_SHAPE, OP_ROWS_DATA, OP_ATTR };
enum { ANS_OK = 0, ANS_ERR = 1, BLOCK_DATA = 1, BLOCK_ERR = 2, BLOCK_SHARED = 3 };

#define BLOCK_BYTES ((size_t)16 << 20)
#define MAX_MSG 2048                    /* an error message from the child */
#define MAX_REQ ((uint32_t)1 << 16)     /* a path or name in a request */
#define MAX_COUNT ((int64_t)1 << 26)    /* strings or values in one answer */
#define MAX_LIST_BYTES ((int64_t)1 << 30)

struct fl_h5_sandbox {
  pid_t pid;
  int sock;
  char *shared;                         /* BLOCK_BYTES mapped in both processes: array blocks */
  char *path;
  double timeout_s, cpu_s;
  char dead[160];                       /* why the reader stopped; "" while it runs */
};

/* ---------------------------------------------------------------- bytes on the wire */

typedef struct { char *p; size_t n, cap; int oom; } wbuf;

static void put(wbuf *b, const void *x, size_t n) {
  if (b->oom) return;
  if (b->n + n > b->cap) {
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->n + n) cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) { b->oom = 1; return; }
    b->p = p;
    b->cap = cap;
  }
  memcpy(b->p + b->n, x, n);
  b->n += n;
}
static void put_u8(wbuf *b, uint8_t v) { put(b, &v, 1); }
static void put_i32(wbuf *b, int32_t v) { put(b, &v, 4); }
static void put_i64(wbuf *b, int64_t v) { put(b, &v, 8); }
static void put_str(wbuf *b, const char *s, size_t n) {
  uint32_t len = (uint32_t)n;
  put(b, &len, 4);
  put(b, s, n);
}

static int send_all(int fd, const void *p, size_t n) {
  const char *c = p;
  while (n > 0) {
    ssize_t k = send(fd, c, n, MSG_NOSIGNAL);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) return -1;
    c += k;
    n -= (size_t)k;
  }
  return 0;
}

/* ---------------------------------------------------------------- the reader process */

static int recv_all_blocking(int fd, void *p, size_t n) {
  char *c = p;
  while (n > 0) {
    ssize_t k = recv(fd, c, n, 0);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) return -1;
    c += k;
    n -= (size_t)k;
  }
  return 0;
}

static void reply(int sock, wbuf *b) {
  if (b->oom) {                /* the answer did not fit: say so instead */
    b->oom = 0;
    b->n = 0;
    put_u8(b, ANS_ERR);
    const char *m = "h5: the reader process ran out of memory building an answer";
    put_str(b, m, strlen(m));
    put_u8(b, 1);
  }
  if (send_all(sock, b->p, b->n) < 0) _exit(0);
  b->n = 0;
}

static void put_err(wbuf *b) {
  const char *m = fl_errmsg();
  put_u8(b, ANS_ERR);
  put_str(b, m, strnlen(m, MAX_MSG));
  put_u8(b, (uint8_t)fl_last_failure_was_oom());
}

static void put_strings(wbuf *b, char **s, int64_t n) {
  put_i64(b, n);
  for (int64_t i = 0; i < n; i++) put_str(b, s[i], strlen(s[i]));
}

/* Array bytes go through the shared block (the reader fills it, says how much, and waits for the
 * parent to copy it out): a socket would move them in 200 KiB pieces, a context switch each. A
 * row larger than the block goes over the socket. */
static char *shared_block;

static void serve_rows(int sock, wbuf *b, fl_h5 *f, const char *op, const char *path, int64_t start,
                       int64_t count) {
  fl_dtype dt;
  int nd;
  int64_t shape[FL_MAXDIM];
  char *buf = NULL;
  int shared = 0;
  if (fl_h5_rows_shape(f, op, path, start, count, &dt, &nd, shape) < 0) goto fail;
  size_t row = fl_dtype_size(dt);
  for (int i = 1; i < nd; i++) row *= (size_t)shape[i];
  int64_t rows = nd == 0 ? 1 : shape[0];
  if (count < 0) start = 0;
  int64_t per = row >= BLOCK_BYTES ? 1 : (int64_t)(BLOCK_BYTES / (row ? row : 1));
  shared = shared_block && row <= BLOCK_BYTES;
  buf = shared ? shared_block : malloc((size_t)(per < rows ? per : rows) * row + 1);
  if (!buf) {
    fl_fail_oom("h5.%s: %s: '%s': the reader process is out of memory (raise its memory limit)", op,
                fl_h5_filename(f), path);
    goto fail;
  }
  for (int64_t r0 = 0; r0 < rows && row > 0; r0 += per) {
    int64_t rc = rows - r0 < per ? rows - r0 : per;
    size_t nb = (size_t)rc * row;
    int r = nd == 0 ? fl_h5_read_raw(f, op, path, 0, -1, buf, nb) : fl_h5_read_raw(f, op, path, start + r0, rc, buf, nb);
    if (r < 0) goto fail;
    put_u8(b, shared ? BLOCK_SHARED : BLOCK_DATA);
    put_i64(b, (int64_t)nb);
    reply(sock, b);
    uint8_t ack;
    if (shared ? recv_all_blocking(sock, &ack, 1) < 0 : send_all(sock, buf, nb) < 0) _exit(0);
  }
  if (!shared) free(buf);
  return;
fail:
  if (!shared) free(buf);
  b->n = 0;
  put_u8(b, BLOCK_ERR);
  put_str(b, fl_errmsg(), strnlen(fl_errmsg(), MAX_MSG));
  put_u8(b, (uint8_t)fl_last_failure_was_oom());
  reply(sock, b);
}

/* One request: u8 op, i64 a, i64 b, then two strings (u32 length, bytes). */
static void serve(int sock, fl_h5 *f) {
  wbuf b = {0};
  char *s[2] = {NULL, NULL};
  for (;;) {
    uint8_t op;
    int64_t a, c;
    uint32_t len[2];
    if (recv_all_blocking(sock, &op, 1) < 0 || recv_all_blocking(sock, &a, 8) < 0 || recv_all_blocking(sock, &c, 8) < 0)
      _exit(0);
    for (int i = 0; i < 2; i++) {
      if (recv_all_blocking(sock, &len[i], 4) < 0 || len[i] > MAX_REQ) _exit(0);
      free(s[i]);
      s[i] = malloc(len[i] + 1);
      if (!s[i] || recv_all_blocking(sock, s[i], len[i]) < 0) _exit(0);
      s[i][len[i]] = 0;
    }
    const char *path = s[0], *name = s[1];
    char **names = NULL;
    int64_t n = 0;
    switch (op) {
    case FL_H5SB_LIST:
    case FL_H5SB_STRINGS:
    case FL_H5SB_ATTRS: {
      int r = op == FL_H5SB_LIST ? fl_h5_list(f, path, &names, &n)
            : op == FL_H5SB_STRINGS ? fl_h5_read_strings(f, path, &names, &n)
            : fl_h5_attr_names(f, path, &names, &n);
      if (r < 0) put_err(&b);
      else { put_u8(&b, ANS_OK); put_strings(&b, names, n); }
      fl_h5_free_strings(names, n);
      break;
    }
    case OP_KIND: {
      int k = fl_h5_kind(f, path);
      if (k < 0) put_err(&b);
      else { put_u8(&b, ANS_OK); put_i32(&b, k); }
      break;
    }
    case OP_INFO: {
      int nd, is_string = 0;
      int64_t shape[FL_MAXDIM];
      fl_dtype dt = FL_U8;
      if (fl_h5_info(f, name, path, &nd, shape, &dt, a ? &is_string : NULL) < 0) { put_err(&b); break; }
      put_u8(&b, ANS_OK);
      put_i32(&b, nd);
      for (int i = 0; i < nd; i++) put_i64(&b, shape[i]);
      put_i32(&b, (int32_t)dt);
      put_i32(&b, is_string);
      break;
    }
    case OP_ROWS_SHAPE: {
      int nd;
      int64_t shape[FL_MAXDIM];
      fl_dtype dt;
      if (fl_h5_rows_shape(f, name, path, a, c, &dt, &nd, shape) < 0) { put_err(&b); break; }
      put_u8(&b, ANS_OK);
      put_i32(&b, nd);
      for (int i = 0; i < nd; i++) put_i64(&b, shape[i]);
      put_i32(&b, (int32_t)dt);
      break;
    }
    case OP_ROWS_DATA:
      serve_rows(sock, &b, f, name, path, a, c);
      continue;
    case OP_ATTR: {
      fl_h5_attr at;
      int r = fl_h5_attr_get(f, path, name, &at);
      if (r < 0) { put_err(&b); break; }
      put_u8(&b, ANS_OK);
      put_u8(&b, (uint8_t)r);
      if (r == 1) {
        put_u8(&b, (uint8_t)at.kind);
        put_u8(&b, (uint8_t)at.scalar);
        if (at.kind == FL_H5A_STRING) put_strings(&b, at.s, at.n);
        else {
          put_i64(&b, at.n);
          put(&b, at.kind == FL_H5A_INT ? (void *)at.i : (void *)at.d, (size_t)at.n * 8);
        }
        fl_h5_attr_free(&at);
      }
      break;
    }
    default:
      _exit(0);
    }
    reply(sock, &b);
  }
}

#ifdef __linux__
/* Allows what reading an open file and answering over the socket needs; everything else
 * (open, fork, exec, kill, socket, ptrace, ...) fails with EPERM. */
static void no_new_syscalls(void) {
#if defined(__x86_64__)
#define ARCH AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
#define ARCH AUDIT_ARCH_AARCH64
#endif
#ifdef ARCH
#define ALLOW(nr) BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (nr), 0, 1), BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW)
  struct sock_filter prog[] = {
    BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, ARCH, 1, 0),
    BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
    BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
    ALLOW(SYS_read), ALLOW(SYS_write), ALLOW(SYS_readv), ALLOW(SYS_writev), ALLOW(SYS_pread64),
    ALLOW(SYS_lseek), ALLOW(SYS_close), ALLOW(SYS_fstat), ALLOW(SYS_newfstatat),
    ALLOW(SYS_mmap), ALLOW(SYS_munmap), ALLOW(SYS_mremap), ALLOW(SYS_brk), ALLOW(SYS_madvise),
    ALLOW(SYS_mprotect), ALLOW(SYS_futex), ALLOW(SYS_sendto), ALLOW(SYS_recvfrom),
    ALLOW(SYS_sendmsg), ALLOW(SYS_recvmsg), ALLOW(SYS_getpid), ALLOW(SYS_gettid),
    ALLOW(SYS_clock_gettime), ALLOW(SYS_gettimeofday), ALLOW(SYS_getrandom),
    ALLOW(SYS_sched_yield), ALLOW(SYS_fcntl), ALLOW(SYS_rt_sigreturn), ALLOW(SYS_rt_sigprocmask),
    ALLOW(SYS_restart_syscall), ALLOW(SYS_exit), ALLOW(SYS_exit_group),
#ifdef SYS_statx
    ALLOW(SYS_statx),
#endif
    BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (EPERM & SECCOMP_RET_DATA)),
  };
#undef ALLOW
  struct sock_fprog fp = {(unsigned short)(sizeof prog / sizeof prog[0]), prog};
  /* every thread (libraries' constructors may have started some in an exec'd reader) */
  if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0 &&
      (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, &fp) != 0))
    prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &fp);
#endif
}
#endif

static void set_limit(int res, rlim_t v) {
  struct rlimit r = {v, v};
  setrlimit(res, &r);
}

__attribute__((noreturn))
static void child_main(int sock, const char *path, size_t vm_now, int64_t memory, double cpu_s) {
#ifdef __linux__
  prctl(PR_SET_PDEATHSIG, SIGKILL);
#endif
  setpgid(0, 0);                          /* Ctrl-C in the terminal is for the parent */
  sigset_t none;
  sigemptyset(&none);
  sigprocmask(SIG_SETMASK, &none, NULL);
  int fatal[] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT, SIGTERM, SIGXCPU};
  for (size_t i = 0; i < sizeof fatal / sizeof fatal[0]; i++) signal(fatal[i], SIG_DFL);
  signal(SIGINT, SIG_IGN);
  signal(SIGPIPE, SIG_IGN);
  /* Every descriptor but the socket goes (stderr stays with FLOWER_H5_READER_STDERR=1, to debug):
   * the parent's files, HDF5's among them, are not ours. The socket's number was free in the
   * parent, so no inherited HDF5 file uses it. */
  int keep2 = getenv("FLOWER_H5_READER_STDERR") != NULL;
  for (int fd = 0; fd < 3; fd++)
    if (fd != sock && !(fd == 2 && keep2)) close(fd);
  if (close_range(3, (unsigned)sock - 1, 0) < 0 || close_range((unsigned)sock + 1, ~0U, 0) < 0)
    for (int fd = 3; fd < 4096; fd++) if (fd != sock) close(fd);
  int null = open("/dev/null", O_RDWR);   /* stdio reads and writes nothing */
  for (int fd = 0; fd < 3 && null >= 0; fd++)
    if (fd != null && !(fd == 2 && keep2)) dup2(null, fd);
  if (null > 2) close(null);
  set_limit(RLIMIT_CORE, 0);
  set_limit(RLIMIT_FSIZE, 0);
  struct rlimit cpu = {(rlim_t)cpu_s, (rlim_t)cpu_s + 1};
  setrlimit(RLIMIT_CPU, &cpu);
#ifndef UNDER_ASAN                        /* ASan reserves terabytes of shadow address space */
  set_limit(RLIMIT_AS, (rlim_t)vm_now + (rlim_t)memory);
#else
  (void)vm_now; (void)memory;
#endif
  fl_h5 *f = NULL;
  wbuf b = {0};
  if (fl_h5_open_reader(&f, path) < 0) {
    put_err(&b);
    reply(sock, &b);
    _exit(0);
  }
#ifdef __linux__
  no_new_syscalls();
#endif
  put_u8(&b, ANS_OK);
  reply(sock, &b);
  serve(sock, f);
  _exit(0);
}

/* ---------------------------------------------------------------- the parent's side */

static size_t vm_size(void) {
  size_t pages = 0;
  FILE *fp = fopen("/proc/self/statm", "r");
  if (fp) {
    if (fscanf(fp, "%zu", &pages) != 1) pages = 0;
    fclose(fp);
  }
  return pages * (size_t)sysconf(_SC_PAGESIZE);
}

static void describe_status(int st, double cpu_s, char *buf, size_t n) {
  if (WIFSIGNALED(st) && WTERMSIG(st) == SIGXCPU)
    snprintf(buf, n, "used up its CPU time limit (%g s)", cpu_s);
  else if (WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL)
    snprintf(buf, n, "was killed (SIGKILL: its CPU time limit of %g s, or the system's out-of-memory killer)", cpu_s);
  else if (WIFSIGNALED(st))
    snprintf(buf, n, "was killed by signal %d (%s)", WTERMSIG(st), strsignal(WTERMSIG(st)));
  else if (WIFEXITED(st))
    snprintf(buf, n, "exited with status %d", WEXITSTATUS(st));
  else
    snprintf(buf, n, "stopped");
}

/* Ends the reader (if it still runs) and reaps it. `grace_ms`: how long to let a reader that
 * closed its end finish dying on its own, so that its own cause of death is reported. */
static void end_reader(fl_h5_sandbox *sb, int grace_ms, char *why, size_t n) {
  if (sb->pid <= 0) return;
  int st = 0;
  pid_t r = 0;
  for (int t = 0; t < grace_ms && r == 0; t += 5) {
    r = waitpid(sb->pid, &st, WNOHANG);
    if (r == 0) usleep(5000);
  }
  if (r != sb->pid) {
    kill(sb->pid, SIGKILL);
    while (waitpid(sb->pid, &st, 0) < 0 && errno == EINTR) {}
    if (why) snprintf(why, n, "was stopped");
  } else if (why) {
    describe_status(st, sb->cpu_s, why, n);
  }
  sb->pid = -1;
  if (sb->sock >= 0) close(sb->sock);
  sb->sock = -1;
}

/* The reader failed us: stop it, remember why, fail the call. */
__attribute__((format(printf, 4, 5)))
static int broken(fl_h5_sandbox *sb, const char *op, const char *obj, const char *fmt, ...) {
  char what[160];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(what, sizeof what, fmt, ap);
  va_end(ap);
  snprintf(sb->dead, sizeof sb->dead, "%s", what);
  return fl_fail("h5.%s: %s: '%s': the HDF5 reader process %s; the file is corrupt or crafted (it was "
                 "read in a separate process: flowerlua is unharmed)", op, sb->path, obj, what);
}

static int died(fl_h5_sandbox *sb, const char *op, const char *obj) {
  char why[120];
  end_reader(sb, 2000, why, sizeof why);
  return broken(sb, op, obj, "%s", why);
}

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Receives exactly n bytes; each wait for more is bounded by the timeout. */
static int rd(fl_h5_sandbox *sb, const char *op, const char *obj, void *p, size_t n) {
  char *c = p;
  while (n > 0) {
    double deadline = now_s() + sb->timeout_s;
    int ready;
    for (;;) {
      double left = deadline - now_s();
      if (left <= 0) { ready = 0; break; }
      struct pollfd pf = {sb->sock, POLLIN, 0};
      ready = poll(&pf, 1, (int)(left * 1000) + 1);
      if (ready >= 0 || errno != EINTR) break;
    }
    if (ready == 0) {
      end_reader(sb, 0, NULL, 0);
      return broken(sb, op, obj, "did not answer within %g s (a hang in libhdf5) and was stopped", sb->timeout_s);
    }
    ssize_t k = recv(sb->sock, c, n, 0);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) return died(sb, op, obj);
    c += k;
    n -= (size_t)k;
  }
  return 0;
}

static int malformed(fl_h5_sandbox *sb, const char *op, const char *obj, const char *what) {
  end_reader(sb, 0, NULL, 0);
  return broken(sb, op, obj, "sent a malformed answer (%s) and was stopped", what);
}

static int usable(fl_h5_sandbox *sb, const char *op) {
  if (sb->dead[0] || sb->pid <= 0)
    return fl_fail("h5.%s: %s: the HDF5 reader process for this file stopped earlier (it %s): reopen the file",
                   op, sb->path, sb->dead[0] ? sb->dead : "was closed");
  return 0;
}

static int request(fl_h5_sandbox *sb, uint8_t op, const char *opname, const char *path, const char *name,
                   int64_t a, int64_t c) {
  if (usable(sb, opname) < 0) return -1;
  size_t lp = strlen(path), ln = strlen(name);
  if (lp > MAX_REQ || ln > MAX_REQ) return fl_fail("h5.%s: %s: '%.60s...': name too long", opname, sb->path, path);
  wbuf b = {0};
  put_u8(&b, op);
  put_i64(&b, a);
  put_i64(&b, c);
  put_str(&b, path, lp);
  put_str(&b, name, ln);
  int r = b.oom ? fl_fail_oom("h5.%s: out of memory", opname) : send_all(sb->sock, b.p, b.n) < 0 ? died(sb, opname, path) : 0;
  free(b.p);
  return r;
}

/* Reads the status byte; for an error answer records the reader's message and returns -1. */
static int status(fl_h5_sandbox *sb, const char *op, const char *obj) {
  uint8_t s;
  if (rd(sb, op, obj, &s, 1) < 0) return -1;
  if (s == ANS_OK) return 0;
  if (s != ANS_ERR) return malformed(sb, op, obj, "bad status");
  uint32_t len;
  if (rd(sb, op, obj, &len, 4) < 0) return -1;
  if (len > MAX_MSG) return malformed(sb, op, obj, "message too long");
  char msg[MAX_MSG + 1];
  uint8_t oom;
  if (rd(sb, op, obj, msg, len) < 0 || rd(sb, op, obj, &oom, 1) < 0) return -1;
  msg[len] = 0;
  for (uint32_t i = 0; i < len; i++)           /* names from the file may hold anything */
    if ((unsigned char)msg[i] < 0x20 || msg[i] == 0x7f) msg[i] = '?';
  return oom ? fl_fail_oom("%s", msg) : fl_fail("%s", msg);
}

static int rd_strings(fl_h5_sandbox *sb, const char *op, const char *obj, char ***out, int64_t *n) {
  *out = NULL;
  *n = 0;
  int64_t cnt;
  if (rd(sb, op, obj, &cnt, 8) < 0) return -1;
  if (cnt < 0 || cnt > MAX_COUNT) return malformed(sb, op, obj, "bad string count");
  char **v = calloc((size_t)(cnt ? cnt : 1), sizeof *v);
  if (!v) return fl_fail_oom("h5.%s: out of memory", op);
  int64_t budget = MAX_LIST_BYTES;
  for (int64_t i = 0; i < cnt; i++) {
    uint32_t len;
    if (rd(sb, op, obj, &len, 4) < 0) goto fail;
    if ((int64_t)len > budget) { malformed(sb, op, obj, "strings too long"); goto fail; }
    budget -= len;
    v[i] = malloc((size_t)len + 1);
    if (!v[i]) { fl_fail_oom("h5.%s: out of memory", op); end_reader(sb, 0, NULL, 0); snprintf(sb->dead, sizeof sb->dead, "was stopped: out of memory"); goto fail; }
    if (rd(sb, op, obj, v[i], len) < 0) goto fail;
    v[i][len] = 0;
    if (memchr(v[i], 0, len)) { malformed(sb, op, obj, "NUL inside a string"); goto fail; }
  }
  *out = v;
  *n = cnt;
  return 0;
fail:
  fl_h5_free_strings(v, cnt);
  return -1;
}

static int rd_shape(fl_h5_sandbox *sb, const char *op, const char *obj, int *ndim, int64_t *shape, fl_dtype *dt) {
  int32_t nd, d;
  if (rd(sb, op, obj, &nd, 4) < 0) return -1;
  if (nd < 0 || nd > FL_MAXDIM) return malformed(sb, op, obj, "bad rank");
  for (int i = 0; i < nd; i++) {
    if (rd(sb, op, obj, &shape[i], 8) < 0) return -1;
    if (shape[i] < 0) return malformed(sb, op, obj, "negative size");
  }
  if (rd(sb, op, obj, &d, 4) < 0) return -1;
  if (d != FL_F32 && d != FL_F64 && d != FL_I32 && d != FL_I64 && d != FL_U8)
    return malformed(sb, op, obj, "bad dtype");
  *ndim = nd;
  *dt = (fl_dtype)d;
  return 0;
}

/* Re-executing the program as the reader gives it an address space of its own: a forked reader
 * shares this process's pages copy-on-write for its whole life, and this process pays a page copy
 * for its first write to each (3-4x on a 700 MB weight file). That works when this code is in the
 * main executable (libflower.a linked into flowerlua, the tests, the fuzzers): its constructor
 * below takes over before main. Elsewhere (libflower.so, the Lua C module) the reader is forked. */
static int phdr_cb(struct dl_phdr_info *info, size_t size, void *data) {
  (void)size;
  uintptr_t a = *(uintptr_t *)data;
  for (int i = 0; i < info->dlpi_phnum; i++) {
    const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
    uintptr_t lo = info->dlpi_addr + ph->p_vaddr;
    if (ph->p_type == PT_LOAD && a >= lo && a < lo + ph->p_memsz) *(uintptr_t *)data = 1;
  }
  return 1;                                /* the first object is the main program: stop */
}

static int in_main_executable(void) {
  uintptr_t a = (uintptr_t)&in_main_executable;
  dl_iterate_phdr(phdr_cb, &a);
  return a == 1;
}

__attribute__((constructor))
static void reader_entry(void) {
  const char *path = getenv("FLOWER_H5_READER_PATH");
  if (!path) return;
  int64_t memory = atoll(getenv("FLOWER_H5_READER_MEMORY") ? getenv("FLOWER_H5_READER_MEMORY") : "0");
  double cpu_s = atof(getenv("FLOWER_H5_READER_CPU") ? getenv("FLOWER_H5_READER_CPU") : "3600");
  void *shm = mmap(NULL, BLOCK_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, 4, 0);
  shared_block = shm == MAP_FAILED ? NULL : shm;
  close(4);
  child_main(3, path, vm_size(), memory > 0 ? memory : (int64_t)2 << 30, cpu_s);
}

int fl_h5sb_start(fl_h5_sandbox **out, const char *path, const fl_h5_limits *lim) {
  *out = NULL;
  fl_h5_sandbox *sb = calloc(1, sizeof *sb);
  if (!sb || !(sb->path = strdup(path))) { free(sb); return fl_fail_oom("h5.open: %s: out of memory", path); }
  const char *env = getenv("FLOWER_H5_UNTRUSTED_TIMEOUT");    /* a default for every caller */
  double dflt = env && atof(env) > 0 ? atof(env) : 60;
  sb->timeout_s = lim && lim->timeout_s > 0 ? lim->timeout_s : dflt;
  sb->cpu_s = lim && lim->cpu_s > 0 ? lim->cpu_s : 3600;
  int64_t memory = lim && lim->memory > 0 ? lim->memory : (int64_t)2 << 30;
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) {
    int e = errno;
    free(sb->path);
    free(sb);
    return fl_fail("h5.open: %s: cannot make a socket for the reader process: %s", path, strerror(e));
  }
  int bufsize = 4 << 20;                  /* fewer round trips for array bytes (the kernel may cap it) */
  setsockopt(sv[0], SOL_SOCKET, SO_RCVBUF, &bufsize, sizeof bufsize);
  setsockopt(sv[1], SOL_SOCKET, SO_SNDBUF, &bufsize, sizeof bufsize);
  int reexec = in_main_executable() && !getenv("FLOWER_H5_READER_FORK");
  int mfd = reexec ? memfd_create("flower-h5-block", MFD_CLOEXEC) : -1;
  if (mfd >= 0 && ftruncate(mfd, BLOCK_BYTES) < 0) { close(mfd); mfd = -1; }
  if (reexec && mfd < 0) reexec = 0;
  void *shm = mmap(NULL, BLOCK_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED | (mfd >= 0 ? 0 : MAP_ANONYMOUS), mfd, 0);
  sb->shared = shm == MAP_FAILED ? NULL : shm;   /* without it, arrays go over the socket */
  /* the reader's environment: ours plus what it is to do (made before fork: no allocation after) */
  extern char **environ;
  size_t ne = 0;
  while (environ[ne]) ne++;
  char **envp = reexec ? calloc(ne + 6, sizeof *envp) : NULL;
  char *ev[3] = {NULL, NULL, NULL};
  /* one thread: thread pools that libraries start at load would sit outside the seccomp filter,
   * or fail inside it */
  static char one_blas[] = "OPENBLAS_NUM_THREADS=1", one_omp[] = "OMP_NUM_THREADS=1";
  if (envp) {
    if (asprintf(&ev[0], "FLOWER_H5_READER_PATH=%s", path) < 0) ev[0] = NULL;
    if (asprintf(&ev[1], "FLOWER_H5_READER_MEMORY=%lld", (long long)memory) < 0) ev[1] = NULL;
    if (asprintf(&ev[2], "FLOWER_H5_READER_CPU=%g", sb->cpu_s) < 0) ev[2] = NULL;
    size_t k = 0;
    for (size_t i = 0; i < ne; i++)
      if (strncmp(environ[i], "FLOWER_H5_READER_", 17) != 0 && strncmp(environ[i], "OPENBLAS_NUM_THREADS=", 21) != 0 &&
          strncmp(environ[i], "OMP_NUM_THREADS=", 16) != 0)
        envp[k++] = environ[i];
    for (int i = 0; i < 3; i++) envp[k++] = ev[i];
    envp[k++] = one_blas;
    envp[k++] = one_omp;
    if (!ev[0] || !ev[1] || !ev[2]) reexec = 0;
  } else {
    reexec = 0;
  }
  size_t vm = vm_size();
  pid_t pid = fork();
  if (pid == 0) {
    close(sv[0]);
    if (reexec && dup2(sv[1], 3) == 3 && dup2(mfd, 4) == 4) {   /* dup2 clears close-on-exec */
      char *argv[] = {"flowerlua-h5-reader", NULL};
      execve("/proc/self/exe", argv, envp);
      _exit(127);
    }
    shared_block = sb->shared;
    child_main(sv[1], path, vm, memory, sb->cpu_s);
  }
  int e = errno;
  close(sv[1]);
  if (mfd >= 0) close(mfd);
  for (int i = 0; i < 3; i++) free(ev[i]);
  free(envp);
  if (pid < 0) {
    close(sv[0]);
    if (sb->shared) munmap(sb->shared, BLOCK_BYTES);
    free(sb->path);
    free(sb);
    return fl_fail("h5.open: %s: cannot start the reader process: %s", path, strerror(e));
  }
  sb->pid = pid;
  sb->sock = sv[0];
  if (status(sb, "open", "/") < 0) {
    fl_h5sb_stop(sb);
    return -1;
  }
  *out = sb;
  return 0;
}

void fl_h5sb_stop(fl_h5_sandbox *sb) {
  if (!sb) return;
  end_reader(sb, 0, NULL, 0);
  if (sb->shared) munmap(sb->shared, BLOCK_BYTES);
  free(sb->path);
  free(sb);
}

int fl_h5sb_kind(fl_h5_sandbox *sb, const char *path) {
  if (request(sb, OP_KIND, "kind", path, "", 0, 0) < 0 || status(sb, "kind", path) < 0) return -1;
  int32_t k;
  if (rd(sb, "kind", path, &k, 4) < 0) return -1;
  if (k < FL_H5_NONE || k > FL_H5_OTHER) return malformed(sb, "kind", path, "bad kind");
  return k;
}

int fl_h5sb_strings(fl_h5_sandbox *sb, int what, const char *op, const char *path, const char *name,
                    char ***out, int64_t *n) {
  *out = NULL;
  *n = 0;
  if (request(sb, (uint8_t)what, op, path, name, 0, 0) < 0 || status(sb, op, path) < 0) return -1;
  return rd_strings(sb, op, path, out, n);
}

int fl_h5sb_info(fl_h5_sandbox *sb, const char *op, const char *path, int *ndim, int64_t *shape,
                 fl_dtype *dt, int *is_string) {
  if (request(sb, OP_INFO, op, path, op, is_string != NULL, 0) < 0 || status(sb, op, path) < 0) return -1;
  if (rd_shape(sb, op, path, ndim, shape, dt) < 0) return -1;
  int32_t s;
  if (rd(sb, op, path, &s, 4) < 0) return -1;
  if (s != 0 && s != 1) return malformed(sb, op, path, "bad string flag");
  if (is_string) *is_string = s;
  return 0;
}

int fl_h5sb_rows_shape(fl_h5_sandbox *sb, const char *op, const char *path, int64_t start, int64_t count,
                       fl_dtype *dt, int *ndim, int64_t *shape) {
  if (request(sb, OP_ROWS_SHAPE, op, path, op, start, count) < 0 || status(sb, op, path) < 0) return -1;
  if (rd_shape(sb, op, path, ndim, shape, dt) < 0) return -1;
  if (count >= 0 && (*ndim == 0 || shape[0] != count)) return malformed(sb, op, path, "rows other than asked for");
  return 0;
}

int fl_h5sb_read_rows(fl_h5_sandbox *sb, const char *op, const char *path, int64_t start, int64_t count,
                      void *buf, size_t nbytes) {
  if (nbytes == 0) return 0;
  if (request(sb, OP_ROWS_DATA, op, path, op, start, count) < 0) return -1;
  size_t got = 0;
  while (got < nbytes) {
    uint8_t tag;
    if (rd(sb, op, path, &tag, 1) < 0) return -1;
    if (tag == BLOCK_ERR) {              /* an ordinary read error: same shape as an error answer */
      uint32_t len;
      uint8_t oom;
      char msg[MAX_MSG + 1];
      if (rd(sb, op, path, &len, 4) < 0) return -1;
      if (len > MAX_MSG) return malformed(sb, op, path, "message too long");
      if (rd(sb, op, path, msg, len) < 0 || rd(sb, op, path, &oom, 1) < 0) return -1;
      msg[len] = 0;
      for (uint32_t i = 0; i < len; i++)
        if ((unsigned char)msg[i] < 0x20 || msg[i] == 0x7f) msg[i] = '?';
      return oom ? fl_fail_oom("%s", msg) : fl_fail("%s", msg);
    }
    if (tag != BLOCK_DATA && tag != BLOCK_SHARED) return malformed(sb, op, path, "bad block tag");
    int64_t len;
    if (rd(sb, op, path, &len, 8) < 0) return -1;
    if (len <= 0 || (size_t)len > nbytes - got) return malformed(sb, op, path, "more data than the shape holds");
    if (tag == BLOCK_SHARED) {
      if ((size_t)len > BLOCK_BYTES || !sb->shared) return malformed(sb, op, path, "shared block too large");
      memcpy((char *)buf + got, sb->shared, (size_t)len);
      uint8_t ack = 1;
      if (send_all(sb->sock, &ack, 1) < 0) return died(sb, op, path);
    } else if (rd(sb, op, path, (char *)buf + got, (size_t)len) < 0) {
      return -1;
    }
    got += (size_t)len;
  }
  return 0;
}

int fl_h5sb_attr_get(fl_h5_sandbox *sb, const char *path, const char *name, fl_h5_attr *a) {
  const char *op = "attr";
  memset(a, 0, sizeof *a);
  if (request(sb, OP_ATTR, op, path, name, 0, 0) < 0 || status(sb, op, path) < 0) return -1;
  uint8_t found, kind, scalar;
  if (rd(sb, op, path, &found, 1) < 0) return -1;
  if (found == 0) return 0;
  if (found != 1) return malformed(sb, op, path, "bad attribute flag");
  if (rd(sb, op, path, &kind, 1) < 0 || rd(sb, op, path, &scalar, 1) < 0) return -1;
  if (kind > FL_H5A_FLOAT || scalar > 1) return malformed(sb, op, path, "bad attribute kind");
  a->kind = (fl_h5_akind)kind;
  a->scalar = scalar;
  if (kind == FL_H5A_STRING) {
    if (rd_strings(sb, op, path, &a->s, &a->n) < 0) return -1;
  } else {
    int64_t n;
    if (rd(sb, op, path, &n, 8) < 0) return -1;
    if (n < 0 || n > MAX_COUNT) return malformed(sb, op, path, "bad value count");
    void *v = calloc((size_t)(n ? n : 1), 8);
    if (!v) return fl_fail_oom("h5.attr: out of memory");
    if (kind == FL_H5A_INT) a->i = v; else a->d = v;
    a->n = n;
    if (rd(sb, op, path, v, (size_t)n * 8) < 0) { fl_h5_attr_free(a); return -1; }
  }
  if (a->scalar && a->n > 1) { fl_h5_attr_free(a); return malformed(sb, op, path, "scalar with several values"); }
  return 1;
}
