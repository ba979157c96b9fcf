/* Minimal C test harness: CHECK prints `not ok - ...` with the location and counts failures;
 * TEST(name) groups checks and prints `ok - name` when all of them held. */
#ifndef FLOWER_CHECK_H
#define FLOWER_CHECK_H
#include <stdio.h>
#include <math.h>

static int check_failures_total, check_failures_here;
static const char *check_test_name = "";

#define TEST(name) for (int once_ = (check_test_begin(name), 1); once_; once_ = 0, check_test_end())
#define CHECK(cond) do { if (!(cond)) { check_failures_here++; \
  printf("not ok - %s: %s:%d: %s\n", check_test_name, __FILE__, __LINE__, #cond); } } while (0)
#define CHECK_NEAR(a, b, tol) do { double a_ = (a), b_ = (b); if (!(fabs(a_ - b_) <= (tol))) { \
  check_failures_here++; printf("not ok - %s: %s:%d: %s = %g, expected %g\n", check_test_name, \
  __FILE__, __LINE__, #a, a_, b_); } } while (0)

static void check_test_begin(const char *name) { check_test_name = name; check_failures_here = 0; }
static void check_test_end(void) {
  if (check_failures_here == 0) printf("ok - %s\n", check_test_name);
  check_failures_total += check_failures_here;
}
static int check_exit(void) { return check_failures_total ? 1 : 0; }
#endif
