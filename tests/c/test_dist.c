/* C tests of core/dist.c as a build without MPI compiles it (FLOWER_MPI undefined here whatever the
 * Makefile says): one rank, every collective a no-op, all_gather a copy, and a launch as several
 * ranks refused with a message that says how to get MPI. The MPI build's collectives are tested
 * across two processes by tests/sh/test_dist.sh. */
#include <stdlib.h>
#include <string.h>
#include "check.h"
#undef FLOWER_MPI
#undef FLOWER_CUDA
#include "../../core/dist.c"

static int has(const char *msg, const char *part) { return strstr(msg, part) != NULL; }

int main(void) {
  unsetenv("OMPI_COMM_WORLD_SIZE"); unsetenv("PMI_SIZE"); unsetenv("PMIX_SIZE"); unsetenv("PMIX_RANK");
  unsetenv("SLURM_NTASKS"); unsetenv("SLURM_PROCID");

  TEST("a launch as 2 ranks without MPI in the build is refused, naming the variable") {
    setenv("OMPI_COMM_WORLD_SIZE", "2", 1);
    CHECK(fl_dist_env_size(NULL) == 2);
    CHECK(fl_dist_init() == -1);
    CHECK(has(fl_errmsg(), "launched as several ranks (OMPI_COMM_WORLD_SIZE=2)"));
    CHECK(has(fl_errmsg(), "built without MPI"));
    CHECK(fl_dist_barrier() == -1);
    unsetenv("OMPI_COMM_WORLD_SIZE");
  }

  TEST("Slurm's SLURM_NTASKS counts only inside a step (with SLURM_PROCID)") {
    setenv("SLURM_NTASKS", "4", 1);
    CHECK(fl_dist_env_size(NULL) == 1);
    setenv("SLURM_PROCID", "0", 1);
    const char *var;
    CHECK(fl_dist_env_size(&var) == 4 && strcmp(var, "SLURM_NTASKS") == 0);
    unsetenv("SLURM_NTASKS"); unsetenv("SLURM_PROCID");
  }

  TEST("no launcher: rank 0 of 1, no MPI") {
    CHECK(fl_dist_init() == 0);
    CHECK(fl_dist_rank() == 0 && fl_dist_size() == 1 && fl_dist_local_rank() == 0);
    CHECK(fl_dist_has_mpi() == 0);
  }

  TEST("one rank: collectives leave values alone, all_gather copies") {
    int64_t shape[2] = {2, 3};
    fl_tensor t = {0}, g = {0};
    CHECK(fl_tensor_init(&t, &fl_cpu_backend, 0, FL_F32, 2, shape) == 0);
    CHECK(fl_fill(&t, 2.5) == 0);
    CHECK(fl_dist_barrier() == 0);
    CHECK(fl_dist_allreduce(&t, FL_DIST_SUM) == 0);
    CHECK(fl_dist_allreduce(&t, FL_DIST_MEAN) == 0);
    CHECK(fl_dist_broadcast(&t, 0) == 0);
    CHECK(((float *)fl_tensor_data(&t))[5] == 2.5f);
    CHECK(fl_dist_all_gather(&g, &t) == 0);
    CHECK(g.storage != t.storage && fl_tensor_same_shape(&g, &t));
    double v[2] = {1, 2};
    CHECK(fl_dist_allreduce_doubles(v, 2, FL_DIST_SUM) == 0 && v[1] == 2);
    fl_tensor *ts[1] = {&t};
    CHECK(fl_dist_allreduce_many(1, ts, 2.0, 8) == 0);      /* the scale still applies */
    CHECK(((float *)fl_tensor_data(&t))[0] == 5.0f);
    fl_tensor_free(&t);
    fl_tensor_free(&g);
  }

  TEST("wrong arguments: messages name the call") {
    int64_t n = 2;
    fl_tensor t = {0};
    CHECK(fl_tensor_init(&t, &fl_cpu_backend, 0, FL_I64, 1, &n) == 0);
    CHECK(fl_dist_allreduce(&t, FL_DIST_MEAN) == -1 && has(fl_errmsg(), "op 'mean' needs a float tensor"));
    CHECK(fl_dist_broadcast(&t, 1) == -1 && has(fl_errmsg(), "root must be a rank 0..0, got 1"));
    fl_tensor *ts[1] = {&t};
    CHECK(fl_dist_allreduce_many(1, ts, 1.0, 64) == -1 && has(fl_errmsg(), "gradients are float32 or float64"));
    CHECK(fl_dist_set_timeout(-1) == -1 && has(fl_errmsg(), "positive number of seconds"));
    CHECK(fl_dist_set_timeout(5) == 0 && fl_dist_timeout() == 5);
    fl_tensor_free(&t);
  }
  return check_exit();
}
