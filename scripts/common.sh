# Shared by scripts/quickstart and scripts/test.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export LARDER_SHARED="${LARDER_SHARED:-$ROOT/../shared}"
BUILD_DIR="${LARDER_BUILD_DIR:-$ROOT/build}"

# install_packages PKG...: installs the missing ones with apt-get when run as root.
install_packages() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" = 0 ]; then
    echo "larder: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "larder: missing packages: ${missing[*]} (run as root, or: sudo apt-get install ${missing[*]})" >&2
    return 1
  fi
}

BUILD_PACKAGES=(g++ cmake ninja-build pkg-config nlohmann-json3-dev libcli11-dev libpcre2-dev libgtest-dev libxxhash-dev libcpp-httplib-dev libboost-dev libdnnl-dev libucx-dev libzmq3-dev cppzmq-dev libmsgpack-cxx-dev)
TEST_PACKAGES=(python3 python3-venv python3-pip python3-numpy python3-torch python3-sentencepiece python3-jinja2 python3-doc libopenblas0-pthread clang-14 libclang-rt-14-dev time etcd-server etcd-client ucx-utils iproute2)
# Node.js is not installed: the e2e test runs the JavaScript openai client only where node and npm are
# already there and npm can reach its registry (these machines' cannot); the Python client is the test.

# setup_venv: $BUILD_DIR/venv, a venv of Debian's python3 with --system-site-packages (numpy, torch,
# jinja2, sentencepiece from apt stay visible) plus the pinned PyPI packages of tests/requirements.txt
# (the official openai client, Hugging Face tokenizers). tests/CMakeLists.txt runs the Python tests with
# it. A no-op when the venv already holds this requirements file (its sha256 is kept in the venv). Where
# PyPI is unreachable it prints one line and returns 0: the tests that need a missing package skip.
setup_venv() {
  local venv="$BUILD_DIR/venv" req="$ROOT/tests/requirements.txt" stamp want
  stamp="$venv/.requirements.sha256"
  want="$(sha256sum "$req" | cut -d' ' -f1)"
  if [ -x "$venv/bin/python3" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && "$venv/bin/python3" -c '' 2>/dev/null; then
    return 0
  fi
  if ! "$venv/bin/python3" -c '' 2>/dev/null; then
    rm -rf "$venv"
    mkdir -p "$BUILD_DIR"
    if ! /usr/bin/python3 -m venv --system-site-packages "$venv" >"$BUILD_DIR/venv.log" 2>&1; then
      echo "larder: cannot create $venv (see $BUILD_DIR/venv.log); tests that need tests/requirements.txt will skip" >&2
      rm -rf "$venv"
      return 0
    fi
  fi
  rm -f "$stamp"
  echo "larder: installing tests/requirements.txt into $venv" >&2
  if "$venv/bin/python3" -m pip install -q --disable-pip-version-check --no-input --timeout 30 --retries 2 \
      -r "$req" >"$venv/pip.log" 2>&1; then
    echo "$want" >"$stamp"
  else
    echo "larder: pip install -r tests/requirements.txt failed, PyPI unreachable? ($(grep '^ERROR' "$venv/pip.log" | tail -n1 | cut -c8-150)); the tests that need those packages will skip (log: $venv/pip.log)" >&2
  fi
}

configure_and_build() {
  cmake -S "$ROOT" -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release "$@" >/dev/null
  ninja -C "$BUILD_DIR" | grep -v '^\[' || true
  [ "${PIPESTATUS[0]}" = 0 ] || { echo "larder: build failed" >&2; exit 1; }
}
