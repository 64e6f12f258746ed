#!/usr/bin/env bash
# The ctest install.consumer_example: installs the build into a temporary prefix, builds
# examples/cpp against that prefix with find_package(fp8kv CONFIG) (a CPU-only configure, no
# CUDA language), and runs it on two calibration files, against the static and the shared
# library. Checks that the shared library exports the public API and nothing else of ours, that
# the installed command and library report the project version, and that an fp8kv::Error thrown
# in the shared library is caught by the example.
#   consumer_test.sh BUILD_DIR SOURCE_DIR CXX_COMPILER [EXTRA_CXX_FLAGS]
# (grep reads here-strings, not pipes: under pipefail, grep -q closing a pipe early fails it.)
set -euo pipefail
build=$1 src=$2 cxx=$3 flags=${4:-}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

# Every namespace-scope function declaration and class in the public headers carries FP8KV_API
# (inline functions, templates and the FP8KV_HD codecs need none): an unmarked one would be
# missing from the shared library.
marked='class FP8KV_API|FP8KV_API|FP8KV_HD|inline|template|constexpr|using|namespace|enum|typedef'
unmarked=$(grep -nE '^(class [A-Za-z_]+[^;]*$|[A-Za-z_][^(]*\()' "$src"/include/fp8kv/*.h |
           grep -vE ":($marked)" || true)
[ -z "$unmarked" ] || fail "public declarations without FP8KV_API (fp8kv/export.h):
$unmarked"

cmake --install "$build" --prefix "$tmp/prefix" >/dev/null
version=$(sed -n 's/^project(fp8kv VERSION \([0-9.]*\).*/\1/p' "$src/CMakeLists.txt")
[ -n "$version" ] || fail "no project(fp8kv VERSION ...) in CMakeLists.txt"
for f in include/fp8kv/backend.h include/fp8kv/export.h include/fp8kv/version.h \
         lib/libfp8kv.a "lib/libfp8kv.so.${version%.*}" lib/cmake/fp8kv/fp8kvConfig.cmake \
         lib/cmake/fp8kv/fp8kvConfigVersion.cmake bin/fp8kv; do
  [ -e "$tmp/prefix/$f" ] || fail "not installed: $f"
done
# lib or lib64 is GNUInstallDirs' choice; Debian's is lib.
[ "$("$tmp/prefix/bin/fp8kv" --version)" = "fp8kv $version" ] || fail "fp8kv --version"
soname=$(objdump -p "$tmp/prefix/lib/libfp8kv.so" | awk '/SONAME/ {print $2}')
[ "$soname" = "libfp8kv.so.${version%.*}" ] || fail "SONAME is '$soname'"

# Exported symbols of ours: public API only. Internals (the CPU backend class, the kernels'
# validation helpers, anything in an anonymous or cpu/cuda namespace) must stay hidden, and so
# must the statically linked CUDA runtime and the header-only json library.
exported=$(nm -D --defined-only -C "$tmp/prefix/lib/libfp8kv.so" | awk '{$1=""; $2=""; print}')
grep -q 'fp8kv::load_calib(' <<<"$exported" || fail "fp8kv::load_calib not exported"
grep -q 'fp8kv::version()' <<<"$exported" || fail "fp8kv::version not exported"
grep -q 'typeinfo for fp8kv::Error' <<<"$exported" || fail "fp8kv::Error's typeinfo not exported"
internal='CpuBackend|validate_|anonymous namespace|nlohmann|cuda[A-Z]'
internal+='|fp8kv::(cpu|cuda|cli|detail)::'
if leaked=$(grep -E "$internal" <<<"$exported"); then
  fail "internal symbols exported:
$leaked"
fi

cmake -S "$src/examples/cpp" -B "$tmp/example" -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DCMAKE_CXX_COMPILER="$cxx" -DCMAKE_CXX_FLAGS="$flags" \
      -DCMAKE_EXE_LINKER_FLAGS="$flags" -DCMAKE_PREFIX_PATH="$tmp/prefix" >/dev/null
cmake --build "$tmp/example" >/dev/null
# The shared build must load the installed library, not one from the build tree.
libs=$(ldd "$tmp/example/fp8kv_example_shared")
grep -q "$tmp/prefix/lib/libfp8kv.so" <<<"$libs" ||
  fail "fp8kv_example_shared does not load the installed libfp8kv.so"

for exe in fp8kv_example fp8kv_example_shared; do
  for calib in "$src/examples/lightllm_per_tensor_qwen2.5_32b.json" \
               "$src/tests/data/calib/ok_per_head.json"; do
    out=$("$tmp/example/$exe" "$calib") || fail "$exe $calib: $out"
    echo "$out"
    grep -q "^fp8kv $version (headers $version)$" <<<"$out" || fail "$exe: version line"
    grep -qE 'fp8-per-(tensor|head) decode, 3 requests, 59 tokens' <<<"$out" ||
      fail "$exe: no decode line"
  done
  # A malformed file: the library's Error reaches the example's catch, exit status 1.
  status=0
  err=$("$tmp/example/$exe" "$src/tests/data/calib/bad_qmax.json" 2>&1) || status=$?
  [ "$status" = 1 ] && grep -q '^fp8kv: error: .*qmax' <<<"$err" ||
    fail "$exe on bad_qmax.json: status $status, '$err'"
done
echo "install.consumer_example: OK"
