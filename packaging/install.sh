#!/usr/bin/env bash
# `make install DESTDIR=... PREFIX=...`: install without the Debian package.
# The virtualenv is built inside DESTDIR, then its scripts are pointed at the final paths
# (the same path rewrite dh-virtualenv does), so a staged tree works once copied to /.
set -euo pipefail
cd "$(dirname "$0")/.."
destdir=${1:-} prefix=${2:-/usr/local} sysconfdir=${3:-/etc} unitdir=${4:-/lib/systemd/system}
python=${PYTHON:-python3}
venv="$prefix/lib/cosyvoiced/venv"
staged="$destdir$venv"
rm -rf "$staged"
"$python" -m venv "$staged"
"$staged/bin/python" -m pip install --quiet --upgrade pip
"$staged/bin/python" -m pip install --quiet .
if [ -n "$destdir" ]; then
    grep -rlI --null "$destdir" "$staged/bin" | xargs -0 -r sed -i "s|$destdir||g"
fi
install -d "$destdir$prefix/bin"
for command in cosyvoiced cosyvoicectl; do
    ln -sf "$venv/bin/$command" "$destdir$prefix/bin/$command"
done
install -D -m 0644 systemd/cosyvoiced.sysusers.conf "$destdir$prefix/lib/sysusers.d/cosyvoiced.conf"
install -D -m 0644 systemd/cosyvoiced.tmpfiles.conf "$destdir$prefix/lib/tmpfiles.d/cosyvoiced.conf"
install -d "$destdir$unitdir"
sed "s|^ExecStart=/usr/bin/cosyvoiced|ExecStart=$prefix/bin/cosyvoiced|" systemd/cosyvoiced.service \
    > "$destdir$unitdir/cosyvoiced.service"
chmod 0644 "$destdir$unitdir/cosyvoiced.service"
if [ ! -e "$destdir$sysconfdir/cosyvoiced/cosyvoiced.toml" ]; then
    install -D -m 0644 etc/cosyvoiced.toml "$destdir$sysconfdir/cosyvoiced/cosyvoiced.toml"
fi
install -D -m 0644 systemd/cosyvoiced-gpu.conf \
    "$destdir$prefix/share/doc/cosyvoiced/examples/cosyvoiced-gpu.conf"
echo "installed under ${destdir:-/}: $venv, $prefix/bin/cosyvoiced{,ctl}, $unitdir/cosyvoiced.service"
if [ -z "$destdir" ]; then
    echo "next: systemd-sysusers; systemd-tmpfiles --create; systemctl daemon-reload; systemctl enable --now cosyvoiced"
fi
