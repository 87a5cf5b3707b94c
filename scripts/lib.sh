# Sourced by the test scripts: installs Debian packages when they are missing, as root or
# through sudo, and says what it installs. Nothing goes into the system's Python by pip.

# apt_install PACKAGE...: installs the packages (apt-get update first).
apt_install() {
  (($#)) || return 0
  local as=()
  if ((EUID != 0)); then
    command -v sudo >/dev/null || { echo "FAIL: installing $* needs root or sudo" >&2; exit 1; }
    as=(sudo)
  fi
  echo "installing Debian packages: $*"
  "${as[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  "${as[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# need_pyyaml: PyYAML for the checks' Python, from Debian (python3-yaml), not pip.
need_pyyaml() {
  command -v python3 >/dev/null || apt_install python3
  python3 -c 'import yaml' 2>/dev/null || apt_install python3-yaml
}
