#!/usr/bin/env bash
# Installs what the DICOM node tests run on this machine (tests/_orthanc.py): Orthanc, a real PACS,
# with its DICOMweb plugin (STOW-RS, QIDO-RS), and DCMTK (storescu/echoscu, clients that are not ours).
# Idempotent; needs root or passwordless sudo. Debian/Ubuntu only (apt-get).
# The tests start Orthancs of their own on free ports; the system service the package starts
# (on 4242/8042, where policy-rc.d does not forbid it) is stopped and disabled again.
set -euo pipefail
need=()
[[ -x /usr/sbin/Orthanc ]] || need+=(orthanc)
[[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]] || need+=(orthanc-dicomweb)
command -v storescu >/dev/null || need+=(dcmtk)
if [[ ${#need[@]} -eq 0 ]]; then
    exit 0
fi
sudo=()
[[ $(id -u) -eq 0 ]] || sudo=(sudo -n)

# The service runs as the package's "orthanc" user; the tests' Orthancs never do. One that ran before
# this script is someone else's and is left alone. (/sbin: not on a Debian user's PATH; a symlink to
# /usr/sbin where /usr is merged.)
ssd=/sbin/start-stop-daemon
system_orthanc_running() {
    getent passwd orthanc >/dev/null && "$ssd" --status --user orthanc --exec /usr/sbin/Orthanc
}
was_running=0
system_orthanc_running && was_running=1

echo "[install_dicom] apt-get install ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
# --no-install-recommends: only what the packages depend on.
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null

if [[ $was_running -eq 0 ]]; then
    # The postinst (and orthanc-dicomweb's restart trigger) start the service through systemd or
    # invoke-rc.d; in containers policy-rc.d usually forbids it, elsewhere it listens on 4242/8042.
    if [[ -d /run/systemd/system ]]; then
        "${sudo[@]}" systemctl disable --now --quiet orthanc.service 2>/dev/null || true
    fi
    # SysV start (no systemd): its pidfile, or any Orthanc of the orthanc user.
    if system_orthanc_running; then
        "${sudo[@]}" "$ssd" --stop --quiet --oknodo --retry=TERM/30/KILL/5 \
            --user orthanc --exec /usr/sbin/Orthanc
        "${sudo[@]}" rm -f /run/orthanc.pid
    fi
    if system_orthanc_running; then
        echo "[install_dicom] the system Orthanc service is still running" >&2
        exit 1
    fi
fi
