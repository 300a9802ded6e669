#!/usr/bin/env bash
# Build the Debian package (bookworm, amd64) with dh-virtualenv: `make deb`.
# Usage: packaging/build-deb.sh [OUTDIR]   (default: dist/)
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-dist}")
tools=(debhelper dh-virtualenv dpkg-dev fakeroot python3-venv python3-dev lintian)
missing=()
for package in "${tools[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" ||
        missing+=("$package")
done
if ((${#missing[@]})); then
    if [ "$(id -u)" = 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            "${missing[@]}" >/dev/null
    else
        echo "build-deb: needs: sudo apt-get install ${missing[*]}" >&2
        exit 1
    fi
fi
version=$(python3 -c 'import re; print(re.search(r"__version__ = \"(.+)\"", open("cosyvoiced/__init__.py").read())[1])')
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
source_dir="$work/cosyvoiced-$version"
mkdir -p "$source_dir"
# The working tree as git sees it (tracked and new files, nothing ignored).
git ls-files -z --cached --others --exclude-standard | xargs -0 -I{} cp --parents {} "$source_dir" 2>/dev/null || true
cp -r packaging/debian "$source_dir/debian"
cp systemd/cosyvoiced.service "$source_dir/debian/cosyvoiced.service"
cp systemd/cosyvoiced.sysusers.conf "$source_dir/debian/cosyvoiced.sysusers"
cp systemd/cosyvoiced.tmpfiles.conf "$source_dir/debian/cosyvoiced.tmpfiles"
(cd "$source_dir" && dpkg-buildpackage -us -uc -b)
mkdir -p "$out"
cp "$work"/cosyvoiced_"$version"-*_amd64.deb "$out"/
deb=$(ls "$out"/cosyvoiced_"$version"-*_amd64.deb | tail -1)
# Two checks skipped: they can only warn or inform (spelling-error-in-binary,
# embedded-javascript-library) and took 40 s of lintian's 130 on the virtualenv's binaries.
lintian --fail-on error --suppress-tags-from-file /dev/null \
    --dont-check-part binaries/spelling,languages/javascript/embedded "$deb"
echo "$deb"
