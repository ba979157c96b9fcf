# flowerlua build. `make` builds ./flowerlua, libflower.a, libflower.so and the Lua C module
# build/lua/flower/core.so; `make test` sets up the test dependencies and runs every test.
# `make CUDA=1` adds the CUDA backend (core/cuda/*.cu) when nvcc is present.

BUILD   ?= build
PREFIX  ?= /usr/local
CC      ?= cc
VERSION := 0.1.0

PKGS      := lua5.4 hdf5
PKG_CFLAGS := $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS   := $(shell pkg-config --libs hdf5 2>/dev/null)

CFLAGS  ?= -O2
CFLAGS  += -std=c11 -D_GNU_SOURCE -Wall -Wextra -Werror -fPIC -fopenmp -g \
           -Icore -Ibindings $(PKG_CFLAGS) -DFLOWER_VERSION='"$(VERSION)"' \
           -DFLOWER_SCRIPTS_DEFAULT='"$(PREFIX)/share/flowerlua/scripts"'
LDLIBS  := $(PKG_LIBS) -ldnnl -lopenblas -ljpeg -lpthread -lm -fopenmp
HOST_LIBS := -llua5.4 -lreadline

# MPI (core/dist.c): Open MPI's compiler flags when its headers are there (libopenmpi-dev), unless
# MPI=0. Linked directly rather than dlopen'ed: MPI handles are implementation-specific (Open MPI's
# are addresses of its globals, MPICH's are integers), so a dlopen shim would mean re-declaring one
# implementation's ABI by hand. MPI_Init runs only under a launcher, so a plain ./flowerlua needs
# the shared library present (it comes with the package) but never starts MPI.
ifneq ($(MPI),0)
  MPI_CFLAGS := $(shell pkg-config --cflags ompi-c 2>/dev/null)
  MPI_LIBS   := $(shell pkg-config --libs ompi-c 2>/dev/null)
endif
ifneq ($(MPI_LIBS),)
  CFLAGS += -DFLOWER_MPI $(MPI_CFLAGS)
  LDLIBS += $(MPI_LIBS)
endif

ifeq ($(SAN),1)
  CFLAGS  += -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
  LDLIBS  += -fsanitize=address,undefined
endif

CORE_SRC := $(wildcard core/*.c core/cpu/*.c core/io/*.c core/data/*.c)
BIND_SRC := $(wildcard bindings/*.c)
HOST_SRC := $(wildcard bindings/host/*.c)

CUDA_HOME ?= /usr/local/cuda
ifeq ($(CUDA),1)
  NVCC      := $(CUDA_HOME)/bin/nvcc
  CUDA_SRC  := $(wildcard core/cuda/*.cu)
  CUDA_OBJ  := $(CUDA_SRC:%.cu=$(BUILD)/%.o)
  CFLAGS    += -DFLOWER_CUDA
  LDLIBS    += -L$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib64 -lcudnn -lcublas -lcudart -lstdc++
  NVFLAGS   ?= -O2 -std=c++17 -Xcompiler -fPIC -Icore -arch=sm_90 \
               --expt-relaxed-constexpr -Werror all-warnings
  # NCCL (core/cuda/dist_nccl.cu) for collectives on GPU tensors, when its header is in the CUDA tree
  ifneq ($(wildcard $(CUDA_HOME)/include/nccl.h),)
    CFLAGS  += -DFLOWER_NCCL
    NVFLAGS += -DFLOWER_NCCL
    LDLIBS  += -lnccl
  endif
endif

LIB_OBJ  := $(CORE_SRC:%.c=$(BUILD)/%.o) $(BIND_SRC:%.c=$(BUILD)/%.o) $(CUDA_OBJ)
HOST_OBJ := $(HOST_SRC:%.c=$(BUILD)/%.o)

TEST_C   := $(wildcard tests/c/test_*.c)
TEST_BIN := $(TEST_C:tests/c/%.c=$(BUILD)/tests/%)

ifeq ($(BUILD),build)
FLOWERLUA := flowerlua
else
FLOWERLUA := $(BUILD)/flowerlua
endif

.PHONY: all deps deps-build test sanitize quickstart install clean bench

all: $(FLOWERLUA) $(BUILD)/libflower.a $(BUILD)/libflower.so $(BUILD)/lua/flower/core.so $(TEST_BIN)

$(BUILD)/%.o: %.c $(wildcard core/*.h core/*/*.h bindings/*.h bindings/host/*.h)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c $< -o $@

# the nn kernels take square roots of values they know are >= 0 (Adam's v): without errno to set,
# sqrt is one instruction and those loops vectorise (results unchanged: sqrt is exactly rounded)
$(BUILD)/core/cpu/nn_%.o: CFLAGS += -fno-math-errno

$(BUILD)/%.o: %.cu $(wildcard core/*.h core/cuda/*.h)
	@mkdir -p $(dir $@)
	$(NVCC) $(NVFLAGS) -c $< -o $@

$(BUILD)/libflower.a: $(LIB_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(BUILD)/libflower.so: $(LIB_OBJ)
	$(CC) -shared -o $@ $^ $(LDLIBS) -llua5.4

# The Lua C module for a stock lua5.4: the interpreter provides the Lua API symbols.
$(BUILD)/lua/flower/core.so: $(LIB_OBJ)
	@mkdir -p $(dir $@)
	$(CC) -shared -o $@ $^ $(LDLIBS)

$(FLOWERLUA): $(HOST_OBJ) $(BUILD)/libflower.a
	$(CC) -o $@ $(HOST_OBJ) $(BUILD)/libflower.a $(LDLIBS) $(HOST_LIBS) -Wl,--export-dynamic

$(BUILD)/tests/%: tests/c/%.c $(BUILD)/libflower.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -Itests/c -o $@ $< $(BUILD)/libflower.a $(LDLIBS) $(HOST_LIBS)

# Everything: build dependencies and the test environment (.venv with TensorFlow/Keras, peers).
deps:
	@bash tools/deps.sh --test

deps-build:
	@bash tools/deps.sh

test: deps
	@$(MAKE) --no-print-directory all
	@FLOWERLUA=./$(FLOWERLUA) BUILD=$(BUILD) bash tests/run.sh

sanitize: deps
	@$(MAKE) --no-print-directory BUILD=build-san SAN=1 all
	@ASAN_OPTIONS=detect_leaks=0:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1 \
	  FLOWERLUA=./build-san/flowerlua BUILD=build-san SANITIZE=1 bash tests/run.sh

quickstart: deps-build
	@$(MAKE) --no-print-directory all
	./flowerlua experiments/quickstart.lua

bench: all
	./flowerlua tests/bench/gemm.lua

install: all
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/lib $(DESTDIR)$(PREFIX)/include \
	  $(DESTDIR)$(PREFIX)/share/flowerlua $(DESTDIR)$(PREFIX)/lib/lua/5.4/flower \
	  $(DESTDIR)$(PREFIX)/share/lua/5.4
	install -m 755 $(FLOWERLUA) $(DESTDIR)$(PREFIX)/bin/flowerlua
	install -m 644 $(BUILD)/libflower.a $(BUILD)/libflower.so $(DESTDIR)$(PREFIX)/lib/
	install -m 644 bindings/flowerlua.h $(DESTDIR)$(PREFIX)/include/
	install -m 644 $(BUILD)/lua/flower/core.so $(DESTDIR)$(PREFIX)/lib/lua/5.4/flower/
	cp -r scripts $(DESTDIR)$(PREFIX)/share/flowerlua/
	cp -r scripts/flower $(DESTDIR)$(PREFIX)/share/lua/5.4/

clean:
	rm -rf build build-san build-fuzz flowerlua

# libFuzzer harnesses (tests/fuzz/): clang with ASan + UBSan over a build of the library made for
# them (build-fuzz/); `make fuzz` runs each for FUZZ_SECONDS on its seed corpus (tests/fuzz/run.sh).
FUZZ_SECONDS ?= 600
FUZZ_TARGETS := jpeg kaggle_json h5 keras
FUZZ_BIN := $(FUZZ_TARGETS:%=build-fuzz/fuzz/fuzz_%)
.PHONY: fuzz fuzz-build
fuzz-build:
	@bash tools/deps.sh --fuzz
	@CFLAGS="-O1 -fsanitize=fuzzer-no-link -w" $(MAKE) --no-print-directory BUILD=build-fuzz \
	  CC=clang SAN=1 build-fuzz/libflower.a
	@$(MAKE) --no-print-directory $(FUZZ_BIN)

build-fuzz/fuzz/fuzz_%: tests/fuzz/fuzz_%.c tests/fuzz/*.h build-fuzz/libflower.a
	@mkdir -p $(dir $@)
	clang -O1 -g -std=c11 -D_GNU_SOURCE -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
	  -Icore -Ibindings -Itests/fuzz $(PKG_CFLAGS) -o $@ $< build-fuzz/libflower.a \
	  $(LDLIBS) -llua5.4

fuzz: fuzz-build
	@FUZZ_SECONDS=$(FUZZ_SECONDS) bash tests/fuzz/run.sh $(FUZZ_TARGETS)
