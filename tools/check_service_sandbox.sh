#!/usr/bin/env bash
# On the board (as root, after `sudo make install`): run probes of every device the service needs inside the
# same sandbox as systemd/edgevision.service, so a hardening line that shuts a device out shows up here
# rather than as a silent camera. Each probe prints "ok" or what failed; the exit status counts the failures.
#
#   sudo tools/check_service_sandbox.sh [systemd/edgevision.service]
#
# The sandbox is the unit's own [Service] lines (users, groups, device policy, namespaces, system call
# filter, limits), given to `systemd-run --pipe --wait`; only the lines that start the daemon (Type=,
# ExecStart=, Restart*, Watchdog*, Timeout*, Notify*) are left out. Not yet run on a board.
set -uo pipefail
unit=${1:-$(dirname "$0")/../systemd/edgevision.service}
python=/opt/edgevision/venv/bin/python
[ "$(id -u)" = 0 ] || { echo "run as root (systemd-run starts a transient unit)"; exit 2; }
[ -d /run/systemd/system ] || { echo "needs a running systemd"; exit 2; }

properties=()
while IFS= read -r line; do
  case "$line" in
    ''|'#'*|'['*) continue ;;
    Type=*|ExecStart=*|Restart*|Watchdog*|Timeout*|Notify*|RuntimeDirectory*|StateDirectory*|LogsDirectory*) continue ;;
  esac
  properties+=(-p "$line")
done < <(sed -n '/^\[Service\]/,/^\[/p' "$unit")

probe() {  # probe NAME COMMAND...: run COMMAND in the sandbox
  local name=$1; shift
  if out=$(systemd-run --quiet --pipe --wait --collect "${properties[@]}" "$@" 2>&1); then
    echo "ok     $name"
  else
    echo "FAILED $name: $(echo "$out" | tail -2 | tr '\n' ' ')"
    failures=$((failures + 1))
  fi
}
failures=0

probe "CSI camera through /tmp/argus_socket (nvarguscamerasrc, one frame)" \
  gst-launch-1.0 -q nvarguscamerasrc num-buffers=1 ! fakesink
probe "V4L2 camera (/dev/video0 opens)" \
  "$python" -c "import os; os.close(os.open('/dev/video0', os.O_RDWR))"
probe "CUDA sees the GPU (cudaGetDeviceCount >= 1)" \
  "$python" -c "import ctypes; n=ctypes.c_int(); r=ctypes.CDLL('libcudart.so').cudaGetDeviceCount(ctypes.byref(n)); assert r==0 and n.value>=1, (r, n.value)"
probe "TensorRT builds a logger and runtime" \
  "$python" -c "import tensorrt as trt; assert trt.Runtime(trt.Logger())"
probe "ALSA capture and playback devices listed" \
  "$python" -c "import sounddevice as sd; d=sd.query_devices(); assert any(x['max_input_channels'] for x in d) and any(x['max_output_channels'] for x in d), d"
probe "evdev button (/dev/input/event* readable)" \
  "$python" -c "import glob, os; [os.close(os.open(p, os.O_RDONLY)) for p in glob.glob('/dev/input/event*')] or exit('no /dev/input/event*')"
probe "libgpiod button (/dev/gpiochip0 opens)" \
  "$python" -c "import os; os.close(os.open('/dev/gpiochip0', os.O_RDWR))"
probe "sysfs GPIO is read-only (ProtectKernelTunables; use devices.button_chip)" \
  sh -c "! test -w /sys/class/gpio/export"
probe "mlock within LimitMEMLOCK (64 MiB)" \
  "$python" -c "import mmap, ctypes; m=mmap.mmap(-1, 64<<20); b=(ctypes.c_char*len(m)).from_buffer(m); assert ctypes.CDLL(None).mlock(b, len(m))==0"
probe "no network (PrivateNetwork)" \
  "$python" -c "
import socket
try:
    s = socket.socket(); s.settimeout(2)
except OSError:
    exit(0)  # RestrictAddressFamilies=AF_UNIX: no IP socket at all
exit(0) if s.connect_ex(('1.1.1.1', 53)) else exit('network reachable')"
echo "$failures probe(s) failed"
exit "$failures"
