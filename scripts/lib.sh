# Helpers shared by the setup scripts (sourced, not run): progress lines and
# idempotent apt installs (a package already installed is never touched).
step() { printf '\033[1m==> %s\033[0m\n' "$*"; }
note() { printf '    %s\n' "$*"; }

apt_missing=()
need_apt() { for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || apt_missing+=("$pkg"); done; }
install_apt() {
  if [ ${#apt_missing[@]} -gt 0 ]; then
    step "apt: installing ${apt_missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${apt_missing[@]}" >/dev/null
    apt_missing=()
  fi
}
