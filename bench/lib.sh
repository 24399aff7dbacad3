# Helpers the bench scripts share (sourced).

# need <command> <Debian package>: installs the package when missing and we are root, or stops.
need() {
  command -v "$1" >/dev/null 2>&1 && return
  if [ "$(id -u)" -eq 0 ] && { apt-get install -y -qq "$2" >/dev/null 2>&1 ||
    { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq "$2" >/dev/null 2>&1; }; } &&
    command -v "$1" >/dev/null 2>&1; then
    return
  fi
  echo "bench needs $1: apt-get install $2" >&2
  exit 1
}

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
