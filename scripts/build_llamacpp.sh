#!/usr/bin/env bash
# Build llama.cpp (the copy vendored in the `llama-cpp-python` source distribution from PyPI) for the
# GGUF parity test (tests/test_gguf_llamacpp.py). Only the `llama` shared library is built (no tools,
# no server, no curl/openssl); the test drives it through the sdist's own ctypes binding
# (`llama_cpp.llama_cpp`), so the binding and the library are always the same version.
#
# Cache folder: $LMFORGE_LLAMACPP_DIR, default ~/.cache/lmforge/llamacpp. After a build it holds
#   lib/      libllama.so and libggml*.so
#   python/   the `llama_cpp` package from the same sdist (put on sys.path; LLAMA_CPP_LIB_PATH=lib/)
#   VERSION   the llama-cpp-python version built
# A second run with the same version does nothing. Needs cmake, a C++ compiler and network to PyPI.
# Builds niced on 2 jobs (set JOBS=N to change): 4.2 min of CPU; 25 min wall on 2 cores shared with other jobs.
set -euo pipefail
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
DIR="${LMFORGE_LLAMACPP_DIR:-$HOME/.cache/lmforge/llamacpp}"
JOBS="${JOBS:-2}"

# The sdist's Python binding imports diskcache (its prompt cache); numpy, jinja2 and typing-extensions
# are lmforge dependencies already.
python -c "import diskcache" 2>/dev/null || python -m pip install -q "diskcache>=5.6"
if [[ -f "$DIR/VERSION" && "$(cat "$DIR/VERSION")" == "$VERSION" && -f "$DIR/lib/libllama.so" ]]; then
  echo "llama.cpp (llama-cpp-python $VERSION) already built in $DIR"
  exit 0
fi
for tool in cmake c++; do
  command -v "$tool" >/dev/null || { echo "build_llamacpp.sh: '$tool' not found; install it first" >&2; exit 1; }
done

mkdir -p "$DIR/src"
sdist="$DIR/src/llama_cpp_python-$VERSION.tar.gz"
if [[ ! -f "$sdist" ]]; then
  python -m pip download --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d "$DIR/src"
fi
src="$DIR/src/llama_cpp_python-$VERSION"
[[ -d "$src" ]] || tar xzf "$sdist" -C "$DIR/src"

# GGML_NATIVE: the CPU's own instruction set (AVX-512 here); no AMX flag is forced.
cmake -S "$src/vendor/llama.cpp" -B "$src/build" -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
  -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DGGML_OPENMP=ON
nice -n 10 cmake --build "$src/build" --target llama -j "$JOBS"

rm -rf "$DIR/lib" "$DIR/python"
mkdir -p "$DIR/lib" "$DIR/python"
find "$src/build" -name 'lib*.so*' \( -name 'libllama*' -o -name 'libggml*' \) -exec cp -P {} "$DIR/lib/" \;
cp -r "$src/llama_cpp" "$DIR/python/llama_cpp"
echo "$VERSION" >"$DIR/VERSION"
echo "built llama.cpp (llama-cpp-python $VERSION) into $DIR"
