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

BUILD_PACKAGES=(g++ cmake ninja-build pkg-config nlohmann-json3-dev libcli11-dev libpcre2-dev libgtest-dev libxxhash-dev libcpp-httplib-dev libdnnl-dev)
TEST_PACKAGES=(python3 python3-numpy python3-torch python3-sentencepiece python3-jinja2 clang-14 libclang-rt-14-dev time)
# Node.js (for the official openai client in the e2e tests): this machine image may ship NodeSource's
# nodejs with npm bundled, which conflicts with Debian's npm package, so test for the command.
install_node() { command -v npm >/dev/null 2>&1 || install_packages nodejs npm; }

configure_and_build() {
  cmake -S "$ROOT" -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release "$@" >/dev/null
  ninja -C "$BUILD_DIR" | grep -v '^\[' || true
  [ "${PIPESTATUS[0]}" = 0 ] || { echo "larder: build failed" >&2; exit 1; }
}
