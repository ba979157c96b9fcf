/* C unit tests of the data core: image.c (decode, resize, orientation, bad input), loader.c
 * (determinism across worker counts, failures, epochs, permutations) and flowers.c. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "data/flowers.h"
#include "data/image.h"
#include "data/loader.h"
#include "tensor.h"

static char tmpdir[256];

static unsigned char *make_jpeg(int w, int h, int cls, uint64_t seed, int quality, int progressive, size_t *len) {
  uint8_t *pix = malloc((size_t)w * h * 3);
  if (fl_flowers_draw(pix, w, h, cls, 20, seed)) { printf("# %s\n", fl_errmsg()); exit(1); }
  unsigned char *jpg = NULL;
  if (fl_jpeg_encode(pix, w, h, 3, quality, progressive, 1, &jpg, len)) { printf("# %s\n", fl_errmsg()); exit(1); }
  free(pix);
  return jpg;
}

static void write_file(const char *path, const void *data, size_t len) {
  FILE *f = fopen(path, "wb");
  if (!f) { printf("# cannot write %s\n", path); exit(1); }
  fwrite(data, 1, len, f);
  fclose(f);
}

static void test_rng(void) {
  TEST("splitmix64 matches the reference sequence") {
    uint64_t s = 0;
    CHECK(fl_rng_next(&s) == 0xE220A8397B1DCDAFull);
    CHECK(fl_rng_next(&s) == 0x6E789E6AA1B965F4ull);
  }
  TEST("rng_below stays in range and hits every value") {
    uint64_t s = 7;
    int seen[5] = { 0 };
    int ok = 1;
    for (int i = 0; i < 1000; i++) {
      uint64_t v = fl_rng_below(&s, 5);
      if (v >= 5) ok = 0; else seen[v]++;
    }
    CHECK(ok);
    for (int i = 0; i < 5; i++) CHECK(seen[i] > 150);
  }
  TEST("permutation is a permutation; numpy RandomState(0).permutation(10)") {
    int64_t p[10];
    CHECK(fl_permutation(p, 10, 0) == 0);
    /* numpy.random.RandomState(0).permutation(10) */
    const int64_t want[10] = { 2, 8, 4, 9, 1, 6, 7, 3, 0, 5 };
    for (int i = 0; i < 10; i++) CHECK(p[i] == want[i]);
    int64_t q[1000];
    int seen[1000] = { 0 };
    fl_permutation(q, 1000, 42);
    for (int i = 0; i < 1000; i++) seen[q[i]]++;
    int all = 1;
    for (int i = 0; i < 1000; i++) all &= seen[i] == 1;
    CHECK(all);
  }
}

static void test_resize(void) {
  fl_resize_ws *ws = fl_resize_ws_new();
  int w = 37, h = 23;
  uint8_t *src = malloc((size_t)w * h * 3), *dst = malloc((size_t)w * h * 3 * 4);
  uint64_t s = 3;
  for (int i = 0; i < w * h * 3; i++) src[i] = (uint8_t)(fl_rng_next(&s) & 0xFF);
  TEST("resize: same size and whole box is a copy") {
    double box[4] = { 0, 0, w, h };
    for (int f = 0; f < FL_NFILTERS; f++) {
      CHECK(fl_resize(ws, src, w, h, (size_t)w * 3, box, dst, w, h, (size_t)w * 3, f) == 0);
      CHECK(memcmp(src, dst, (size_t)w * h * 3) == 0);
    }
  }
  TEST("resize: constant image stays constant for every filter, up and down") {
    uint8_t *c = malloc((size_t)w * h * 3);
    memset(c, 77, (size_t)w * h * 3);
    int sizes[3][2] = { { 10, 7 }, { 60, 50 }, { 37, 5 } };
    for (int f = 0; f < FL_NFILTERS; f++)
      for (int k = 0; k < 3; k++) {
        double box[4] = { 1.5, 0.25, w - 2.0, h - 0.5 };
        int dw = sizes[k][0], dh = sizes[k][1];
        CHECK(fl_resize(ws, c, w, h, (size_t)w * 3, box, dst, dw, dh, (size_t)dw * 3, f) == 0);
        int ok = 1;
        for (int i = 0; i < dw * dh * 3; i++) ok &= dst[i] == 77;
        CHECK(ok);
      }
    free(c);
  }
  TEST("resize: box filter halving is the rounded 2x2 mean (horizontal then vertical)") {
    int W = 8, H = 6;
    uint8_t img[8 * 6 * 3], out[4 * 3 * 3];
    for (int i = 0; i < W * H * 3; i++) img[i] = (uint8_t)(fl_rng_next(&s) & 0xFF);
    double box[4] = { 0, 0, W, H };
    CHECK(fl_resize(ws, img, W, H, (size_t)W * 3, box, out, 4, 3, 12, FL_FILTER_BOX) == 0);
    int ok = 1;
    for (int y = 0; y < 3; y++)
      for (int x = 0; x < 4; x++)
        for (int c = 0; c < 3; c++) {
          int a = (img[((2 * y) * W + 2 * x) * 3 + c] + img[((2 * y) * W + 2 * x + 1) * 3 + c] + 1) / 2;
          int b = (img[((2 * y + 1) * W + 2 * x) * 3 + c] + img[((2 * y + 1) * W + 2 * x + 1) * 3 + c] + 1) / 2;
          ok &= out[(y * 4 + x) * 3 + c] == (a + b + 1) / 2;
        }
    CHECK(ok);
  }
  TEST("resize: a box outside the image is refused") {
    double box[4] = { 0, 0, w + 1.0, h };
    CHECK(fl_resize(ws, src, w, h, (size_t)w * 3, box, dst, 5, 5, 15, FL_FILTER_BILINEAR) == FL_IMG_BAD_ARG);
  }
  free(src);
  free(dst);
  fl_resize_ws_free(ws);
}

static void test_orient(void) {
  TEST("orientation: each EXIF transform undone by its inverse; 6 rotates clockwise") {
    int w = 5, h = 3;
    uint8_t src[5 * 3 * 3], a[5 * 3 * 3], b[5 * 3 * 3];
    for (int i = 0; i < w * h * 3; i++) src[i] = (uint8_t)i;
    const int inv[9] = { 0, 1, 2, 3, 4, 5, 8, 7, 6 };
    for (int o = 1; o <= 8; o++) {
      int aw, ah, bw, bh;
      fl_image_orient(src, w, h, o, a, &aw, &ah);
      fl_image_orient(a, aw, ah, inv[o], b, &bw, &bh);
      CHECK(bw == w && bh == h && memcmp(src, b, sizeof src) == 0);
    }
    int aw, ah;
    fl_image_orient(src, w, h, 6, a, &aw, &ah);
    /* rotating clockwise puts the bottom-left stored pixel at the top-left */
    CHECK(aw == 3 && ah == 5 && a[0] == src[(2 * w + 0) * 3]);
  }
}

static void test_decode(void) {
  fl_decoder *d = fl_decoder_new();
  size_t len;
  unsigned char *jpg = make_jpeg(320, 240, 4, 11, 95, 0, &len);
  fl_image img = { 0 };
  fl_transform t;
  uint64_t rng = 0;

  TEST("decode: info reads the size, components and orientation") {
    fl_jpeg_info info;
    CHECK(fl_decoder_info(d, jpg, len, &info) == 0);
    CHECK(info.width == 320 && info.height == 240 && info.components == 3 && info.orientation == 1);
    CHECK(info.progressive == 0);
  }
  TEST("decode: round trips: smooth image within 1.5 on average, drawn photo within 4") {
    uint8_t *pix = malloc(320 * 240 * 3);
    for (int y = 0; y < 240; y++)
      for (int x = 0; x < 320; x++) {
        uint8_t *p = pix + (y * 320 + x) * 3;
        p[0] = (uint8_t)(x * 255 / 319);
        p[1] = (uint8_t)(y * 255 / 239);
        p[2] = (uint8_t)(128 + 100 * ((x + y) % 64 < 32 ? (x + y) % 32 : 32 - (x + y) % 32) / 32);
      }
    unsigned char *j444;
    size_t l444;
    CHECK(fl_jpeg_encode(pix, 320, 240, 3, 95, 0, 0, &j444, &l444) == 0);
    fl_transform_defaults(&t);
    t.mode = FL_TF_NONE;
    CHECK(fl_decoder_transform(d, j444, l444, &t, &rng, &img) == 0);
    CHECK(img.w == 320 && img.h == 240);
    double sum = 0;
    for (int i = 0; i < 320 * 240 * 3; i++) sum += abs((int)img.data[i] - (int)pix[i]);
    CHECK(sum / (320 * 240 * 3) < 1.5);
    free(j444);
    /* the drawn photo has sensor noise, which quality 95 does not keep exactly */
    fl_flowers_draw(pix, 320, 240, 4, 20, 11);
    CHECK(fl_decoder_transform(d, jpg, len, &t, &rng, &img) == 0);
    sum = 0;
    for (int i = 0; i < 320 * 240 * 3; i++) sum += abs((int)img.data[i] - (int)pix[i]);
    CHECK(sum / (320 * 240 * 3) < 4.0);
    free(pix);
  }
  TEST("decode: DCT scaling 4/8 gives half the size") {
    fl_transform_defaults(&t);
    t.mode = FL_TF_NONE;
    t.none_scale = 4;
    CHECK(fl_decoder_transform(d, jpg, len, &t, &rng, &img) == 0);
    CHECK(img.w == 160 && img.h == 120);
  }
  TEST("decode: reading only the crop's rows and columns equals decoding everything") {
    int modes[3] = { FL_TF_CENTER, FL_TF_RANDOM_RESIZED, FL_TF_RESIZE };
    int sizes[3][2] = { { 64, 64 }, { 100, 50 }, { 299, 299 } };
    fl_image ref = { 0 };
    int ok = 1;
    for (int prog = 0; prog < 2; prog++) {
      size_t l2;
      unsigned char *j2 = prog ? make_jpeg(333, 250, 7, 5, 90, 1, &l2) : jpg;
      if (!prog) l2 = len;
      for (int m = 0; m < 3; m++)
        for (int sz = 0; sz < 3; sz++)
          for (int fast = 0; fast < 2; fast++)
            for (int seed = 0; seed < 4; seed++) {
              fl_transform_defaults(&t);
              t.mode = modes[m];
              t.out_w = sizes[sz][0];
              t.out_h = sizes[sz][1];
              t.fast = fast;
              t.filter = seed % FL_NFILTERS;
              uint64_t r1 = (uint64_t)seed, r2 = (uint64_t)seed;
              int s1 = fl_decoder_transform(d, j2, l2, &t, &r1, &img);
              t.full_decode = 1;
              int s2 = fl_decoder_transform(d, j2, l2, &t, &r2, &ref);
              if (s1 || s2 || memcmp(img.data, ref.data, (size_t)t.out_w * t.out_h * 3) != 0) {
                ok = 0;
                printf("# mismatch: progressive %d mode %d size %dx%d fast %d seed %d (%d %d)\n", prog, m,
                       t.out_w, t.out_h, fast, seed, s1, s2);
              }
            }
      if (prog) free(j2);
    }
    CHECK(ok);
    fl_image_free(&ref);
  }
  TEST("decode: flip is a mirror of the unflipped crop") {
    fl_transform_defaults(&t);
    t.out_w = t.out_h = 48;
    fl_image a = { 0 };
    uint64_t r = 0;
    CHECK(fl_decoder_transform(d, jpg, len, &t, &r, &a) == 0);
    t.hflip = 1;
    /* find a seed whose flip bit is set */
    int found = 0;
    for (uint64_t seed = 0; seed < 16 && !found; seed++) {
      uint64_t r1 = seed, probe = seed;
      if (!(fl_rng_next(&probe) >> 63)) continue;
      CHECK(fl_decoder_transform(d, jpg, len, &t, &r1, &img) == 0);
      fl_image_hflip(img.data, img.w, img.h);
      found = memcmp(img.data, a.data, 48 * 48 * 3) == 0;
    }
    CHECK(found);
    fl_image_free(&a);
  }
  TEST("decode: jitter changes pixels, stays deterministic") {
    fl_transform_defaults(&t);
    t.out_w = t.out_h = 32;
    t.brightness = t.contrast = t.saturation = 0.4;
    fl_image a = { 0 };
    uint64_t r1 = 9, r2 = 9, r3 = 10;
    CHECK(fl_decoder_transform(d, jpg, len, &t, &r1, &a) == 0);
    CHECK(fl_decoder_transform(d, jpg, len, &t, &r2, &img) == 0);
    CHECK(memcmp(a.data, img.data, 32 * 32 * 3) == 0);
    CHECK(fl_decoder_transform(d, jpg, len, &t, &r3, &img) == 0);
    CHECK(memcmp(a.data, img.data, 32 * 32 * 3) != 0);
    fl_image_free(&a);
  }

  TEST("bad input: empty, not a JPEG, truncated, corrupt header, garbage scan, missing file") {
    fl_transform_defaults(&t);
    CHECK(fl_decoder_transform(d, jpg, 0, &t, &rng, &img) == FL_IMG_EMPTY);
    const unsigned char png[16] = { 0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n', 0, 0, 0, 13, 'I', 'H', 'D', 'R' };
    CHECK(fl_decoder_transform(d, png, sizeof png, &t, &rng, &img) == FL_IMG_NOT_JPEG);
    CHECK(strstr(fl_errmsg(), "PNG") != NULL);
    CHECK(fl_decoder_transform(d, jpg, len * 6 / 10, &t, &rng, &img) == FL_IMG_TRUNCATED);
    CHECK(fl_decoder_transform(d, jpg, 40, &t, &rng, &img) == FL_IMG_TRUNCATED);
    unsigned char *bad = malloc(len);
    memcpy(bad, jpg, len);
    /* zero the frame's height and width (SOF0: FF C0, length, precision, height, width) */
    for (size_t i = 2; i + 9 < len; i++)
      if (bad[i] == 0xFF && bad[i + 1] == 0xC0) { memset(bad + i + 5, 0, 4); break; }
    CHECK(fl_decoder_transform(d, bad, len, &t, &rng, &img) == FL_IMG_CORRUPT);
    CHECK(fl_errmsg()[0] != 0);
    /* garbage over the middle of the entropy-coded data, including marker bytes */
    memcpy(bad, jpg, len);
    for (size_t i = len / 2; i < len / 2 + 200; i++) bad[i] = (i & 1) ? 0xFF : (uint8_t)(0xD0 + (i % 7));
    int s = fl_decoder_transform(d, bad, len, &t, &rng, &img);
    CHECK(s == FL_IMG_CORRUPT || s == FL_IMG_TRUNCATED);
    free(bad);
    const uint8_t *buf;
    size_t l;
    CHECK(fl_decoder_read_file(d, "/nonexistent/flowerlua/x.jpg", &buf, &l) == FL_IMG_MISSING);
    /* the decoder still works after all that */
    CHECK(fl_decoder_transform(d, jpg, len, &t, &rng, &img) == 0);
  }
  TEST("bad input: transform parameters are checked") {
    fl_transform_defaults(&t);
    t.crop_frac = 0;
    CHECK(fl_transform_check(&t) == FL_IMG_BAD_ARG && strstr(fl_errmsg(), "crop_frac"));
    CHECK(fl_decoder_transform(d, jpg, len, &t, &rng, &img) == FL_IMG_BAD_ARG);
  }
  TEST("bad files: FIFO, directory, 2-byte FF D8, a large non-JPEG and an oversized JPEG are refused unread") {
    const uint8_t *buf;
    size_t l;
    char p[400];
    fl_transform_defaults(&t);
    /* a FIFO with no writer: opening it for reading would block; it must be refused at once */
    snprintf(p, sizeof p, "%s/fifo.jpg", tmpdir);
    CHECK(mkfifo(p, 0600) == 0);
    CHECK(fl_decoder_read_file(d, p, &buf, &l) == FL_IMG_NOT_FILE && strstr(fl_errmsg(), "FIFO"));
    CHECK(fl_decoder_read_file(d, tmpdir, &buf, &l) == FL_IMG_NOT_FILE && strstr(fl_errmsg(), "directory"));
    CHECK(fl_decoder_read_file(d, "/dev/zero", &buf, &l) == FL_IMG_NOT_FILE && strstr(fl_errmsg(), "device"));
    snprintf(p, sizeof p, "%s/two.jpg", tmpdir);
    write_file(p, "\xFF\xD8", 2);
    CHECK(fl_decoder_read_file(d, p, &buf, &l) == FL_IMG_TRUNCATED && strstr(fl_errmsg(), "2 bytes"));
    CHECK(fl_decoder_transform(d, (const uint8_t *)"\xFF\xD8", 2, &t, &rng, &img) == FL_IMG_TRUNCATED);
    /* 1 GiB (sparse) that is not a JPEG, and 300 MiB that claims to be: neither is read whole */
    struct rusage ru0, ru1;
    getrusage(RUSAGE_SELF, &ru0);
    snprintf(p, sizeof p, "%s/big.jpg", tmpdir);
    write_file(p, "\x89PNG\r\n\x1a\n", 8);
    CHECK(truncate(p, (off_t)1 << 30) == 0);
    CHECK(fl_decoder_read_file(d, p, &buf, &l) == FL_IMG_NOT_JPEG && strstr(fl_errmsg(), "PNG"));
    write_file(p, "\xFF\xD8\xFF\xE0", 4);
    CHECK(truncate(p, (off_t)300 << 20) == 0);
    CHECK(fl_decoder_read_file(d, p, &buf, &l) == FL_IMG_TOO_LARGE && strstr(fl_errmsg(), "314572800 bytes"));
    getrusage(RUSAGE_SELF, &ru1);
    CHECK(ru1.ru_maxrss - ru0.ru_maxrss < 64 * 1024);  /* KiB: nothing near the file's size */
    remove(p);
    /* an ordinary file still reads */
    snprintf(p, sizeof p, "%s/ok.jpg", tmpdir);
    write_file(p, jpg, len);
    CHECK(fl_decoder_read_file(d, p, &buf, &l) == 0 && l == len && memcmp(buf, jpg, len) == 0);
    remove(p);
  }
  TEST("encode: gray and 4:4:4 round trips") {
    uint8_t g[64 * 48];
    for (int i = 0; i < 64 * 48; i++) g[i] = (uint8_t)(i % 64 * 4);
    unsigned char *out;
    size_t ol;
    CHECK(fl_jpeg_encode(g, 64, 48, 1, 95, 0, 0, &out, &ol) == 0);
    fl_jpeg_info info;
    CHECK(fl_decoder_info(d, out, ol, &info) == 0 && info.components == 1);
    fl_transform_defaults(&t);
    t.mode = FL_TF_NONE;
    CHECK(fl_decoder_transform(d, out, ol, &t, &rng, &img) == 0);
    int maxd = 0;
    for (int i = 0; i < 64 * 48; i++)
      for (int c = 0; c < 3; c++) {
        int dd = abs((int)img.data[3 * i + c] - g[i]);
        if (dd > maxd) maxd = dd;
      }
    CHECK(maxd <= 8);
    free(out);
    CHECK(fl_jpeg_encode(g, 0, 48, 1, 95, 0, 0, &out, &ol) == -1);
  }
  fl_image_free(&img);
  free(jpg);
  fl_decoder_free(d);
}

/* loader with a malloc allocator */
static void *m_alloc(void *ud, size_t n, void **h) { (void)ud; void *p = malloc(n); *h = p; return p; }
static void m_release(void *ud, void *h) { (void)ud; free(h); }

typedef struct { int nb; int n[16]; int64_t idx[16][8]; uint8_t *data[16]; int nfail; int64_t fail_idx[4]; int fail_status[4]; } epoch_out;

static int run_epoch(const char *const *paths, int n, int workers, int64_t epoch, int shuffle, epoch_out *o) {
  fl_loader_config cfg = { 0 };
  cfg.n = n;
  cfg.paths = paths;
  cfg.batch_size = 4;
  cfg.shuffle = shuffle;
  cfg.workers = workers;
  cfg.seed = 123;
  fl_transform_defaults(&cfg.tf);
  cfg.tf.mode = FL_TF_RANDOM_RESIZED;
  cfg.tf.out_w = cfg.tf.out_h = 24;
  cfg.tf.hflip = 1;
  cfg.dtype = FL_OUT_U8;
  cfg.alloc = (fl_batch_alloc){ m_alloc, m_release, NULL };
  fl_loader *ld = fl_loader_new(&cfg);
  if (!ld) { printf("# %s\n", fl_errmsg()); return -1; }
  memset(o, 0, sizeof *o);
  /* start a different epoch first and abandon it midway: must not disturb the next one */
  fl_loader_start(ld, epoch + 100);
  fl_loader_batch b;
  fl_loader_next(ld, &b);
  free(b.handle);
  if (fl_loader_start(ld, epoch)) { printf("# %s\n", fl_errmsg()); return -1; }
  int r;
  while ((r = fl_loader_next(ld, &b)) == 1) {
    o->n[o->nb] = b.n;
    memcpy(o->idx[o->nb], b.index, sizeof(int64_t) * b.n);
    o->data[o->nb] = b.data;
    for (int i = 0; i < b.nfailed && o->nfail < 4; i++) {
      o->fail_idx[o->nfail] = b.failed[i].index;
      o->fail_status[o->nfail++] = b.failed[i].status;
    }
    o->nb++;
  }
  fl_loader_free(ld);
  return r;
}

static void free_epoch(epoch_out *o) { for (int i = 0; i < o->nb; i++) free(o->data[i]); }

static void test_loader(void) {
  enum { N = 11 };
  char names[N][300];
  const char *paths[N];
  for (int i = 0; i < N; i++) {
    snprintf(names[i], sizeof names[i], "%s/img%d.jpg", tmpdir, i);
    paths[i] = names[i];
    if (i == 6) { write_file(names[i], "not a jpeg at all", 17); continue; }
    if (i == 9) continue;  /* missing */
    size_t len;
    unsigned char *j = make_jpeg(80 + 7 * i, 60 + 3 * i, i % 20, (uint64_t)i, 85, i % 3 == 0, &len);
    write_file(names[i], j, len);
    free(j);
  }
  epoch_out a, b, c;
  TEST("loader: same batches for 0, 1 and 3 workers; bad files reported and dropped") {
    CHECK(run_epoch(paths, N, 0, 2, 1, &a) == 0);
    CHECK(run_epoch(paths, N, 1, 2, 1, &b) == 0);
    CHECK(run_epoch(paths, N, 3, 2, 1, &c) == 0);
    CHECK(a.nb == 3 && b.nb == 3 && c.nb == 3);
    int total = 0, same = 1;
    for (int k = 0; k < a.nb; k++) {
      total += a.n[k];
      same &= a.n[k] == b.n[k] && a.n[k] == c.n[k];
      same &= memcmp(a.idx[k], b.idx[k], sizeof(int64_t) * a.n[k]) == 0 && memcmp(a.idx[k], c.idx[k], sizeof(int64_t) * a.n[k]) == 0;
      same &= memcmp(a.data[k], b.data[k], (size_t)a.n[k] * 24 * 24 * 3) == 0 && memcmp(a.data[k], c.data[k], (size_t)a.n[k] * 24 * 24 * 3) == 0;
    }
    CHECK(same);
    CHECK(total == N - 2);
    CHECK(a.nfail == 2);
    int saw6 = 0, saw9 = 0;
    for (int i = 0; i < a.nfail; i++) {
      if (a.fail_idx[i] == 6) saw6 = a.fail_status[i] == FL_IMG_NOT_JPEG;
      if (a.fail_idx[i] == 9) saw9 = a.fail_status[i] == FL_IMG_MISSING;
    }
    CHECK(saw6 && saw9);
  }
  TEST("loader: another epoch gives another order and other crops") {
    epoch_out e;
    CHECK(run_epoch(paths, N, 2, 3, 1, &e) == 0);
    int same_order = 1;
    for (int k = 0; k < a.nb && k < e.nb; k++)
      same_order &= a.n[k] == e.n[k] && memcmp(a.idx[k], e.idx[k], sizeof(int64_t) * a.n[k]) == 0;
    CHECK(!same_order);
    free_epoch(&e);
  }
  TEST("loader: without shuffle the order is 0..n-1") {
    epoch_out e;
    CHECK(run_epoch(paths, N, 2, 0, 0, &e) == 0);
    int64_t want = 0;
    int ok = 1;
    for (int k = 0; k < e.nb; k++)
      for (int i = 0; i < e.n[k]; i++) {
        if (want == 6 || want == 9) want++;
        ok &= e.idx[k][i] == want++;
      }
    CHECK(ok);
    free_epoch(&e);
  }
  free_epoch(&a);
  free_epoch(&b);
  free_epoch(&c);
  TEST("loader: invalid configurations are refused with a message") {
    fl_loader_config cfg = { 0 };
    cfg.n = 1;
    cfg.paths = paths;
    cfg.batch_size = 0;
    fl_transform_defaults(&cfg.tf);
    cfg.alloc = (fl_batch_alloc){ m_alloc, m_release, NULL };
    CHECK(fl_loader_new(&cfg) == NULL && strstr(fl_errmsg(), "batch_size"));
    cfg.batch_size = 2;
    cfg.dtype = FL_OUT_U8;
    cfg.preprocess = FL_PRE_CAFFE;
    CHECK(fl_loader_new(&cfg) == NULL && strstr(fl_errmsg(), "float32"));
  }
  TEST("pixel stats: exact sums, failures flagged") {
    fl_pixel_sums acc = { 0 };
    int status[N];
    char (*msgs)[192] = malloc(sizeof(char[192]) * N);
    CHECK(fl_pixel_stats(paths, N, 2, 0, &acc, status, msgs) == 0);
    CHECK(status[6] == FL_IMG_NOT_JPEG && status[9] == FL_IMG_MISSING && status[0] == 0);
    uint64_t pixels = 0;
    for (int i = 0; i < N; i++)
      if (i != 6 && i != 9) pixels += (uint64_t)(80 + 7 * i) * (60 + 3 * i);
    CHECK(acc.pixels == pixels);
    CHECK(acc.sum[0] > 0 && acc.sumsq[0] >= acc.sum[0]);
    free(msgs);
  }
  for (int i = 0; i < N; i++) remove(names[i]);
}

static void test_flowers(void) {
  TEST("flowers: attribute grid and distinct classes") {
    int nc, ns, np;
    fl_flowers_grid(20, &nc, &ns, &np);
    CHECK(nc == 3 && ns == 3 && np == 3);
    fl_flowers_grid(997, &nc, &ns, &np);
    CHECK(nc * ns * np >= 997 && nc <= 8 && ns <= 6);
    int K = 997, distinct = 1;
    fl_flower_class *cl = malloc(sizeof *cl * K);
    for (int c = 0; c < K; c++) fl_flowers_class(c, K, &cl[c]);
    for (int a = 0; a < K && distinct; a++)
      for (int b = a + 1; b < K; b++)
        if (cl[a].petals == cl[b].petals && cl[a].shape == cl[b].shape && cl[a].palette == cl[b].palette) { distinct = 0; break; }
    CHECK(distinct);
    free(cl);
    fl_flower_class x;
    CHECK(fl_flowers_class(20, 20, &x) == -1);
  }
  TEST("flowers: same seed same pixels, other seed other pixels") {
    uint8_t *a = malloc(200 * 150 * 3), *b = malloc(200 * 150 * 3);
    CHECK(fl_flowers_draw(a, 200, 150, 3, 20, 99) == 0);
    CHECK(fl_flowers_draw(b, 200, 150, 3, 20, 99) == 0);
    CHECK(memcmp(a, b, 200 * 150 * 3) == 0);
    CHECK(fl_flowers_draw(b, 200, 150, 3, 20, 100) == 0);
    CHECK(memcmp(a, b, 200 * 150 * 3) != 0);
    CHECK(fl_flowers_draw(b, 200, 150, 25, 20, 100) == -1 && strstr(fl_errmsg(), "class"));
    free(a);
    free(b);
  }
  TEST("flowers: write files atomically; an unwritable path fails with its name") {
    char p1[300], p2[300];
    snprintf(p1, sizeof p1, "%s/f1.jpg", tmpdir);
    snprintf(p2, sizeof p2, "%s/nodir/f2.jpg", tmpdir);
    fl_flowers_job jobs[2] = { { p1, 1, 120, 90, 90, 5 }, { p2, 2, 120, 90, 90, 6 } };
    CHECK(fl_flowers_write(jobs, 1, 20, 2) == 0);
    CHECK(access(p1, R_OK) == 0);
    CHECK(fl_flowers_write(jobs + 1, 1, 20, 1) == -1 && strstr(fl_errmsg(), "nodir"));
    remove(p1);
  }
}

int main(void) {
  snprintf(tmpdir, sizeof tmpdir, "/tmp/flowerlua_test_image_%d", (int)getpid());
  char cmd[300];
  snprintf(cmd, sizeof cmd, "mkdir -p %s", tmpdir);
  if (system(cmd) != 0) return 1;
  test_rng();
  test_resize();
  test_orient();
  test_decode();
  test_loader();
  test_flowers();
  snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
  if (system(cmd) != 0) return 1;
  return check_exit();
}
