#!/bin/sh
# /init of livesnap's writer test guest (busybox ash, no fork in the hot path except dd).
#
# Kernel command line (all optional but disks):
#   livesnap.disks=vda,vdb     virtio disks to write (round robin, one record per step)
#   livesnap.ring_mib=4        ring size per disk in MiB (nslots = ring_mib * 256 records of 4 KiB)
#   livesnap.interval_ms=20    pause after every write (also the console-command poll)
#   livesnap.run=ID            run id written into every record ([A-Za-z0-9_.-], no spaces)
#
# Record (4096 bytes at offset slot*4096 of the raw disk, slot = seq mod nslots): 8 sectors of
# 512 bytes, sector k = printf '%-511.511s\n' "LSNAP1 <run> <disk> <seq> <slot> <k> <F>" where
# F is "<seq>-" repeated (the padding depends on seq, so a stale or torn sector is visible).
# Written with dd conv=notrunc,fsync oflag=direct; only after dd returns 0 the console gets
#   ACK <disk> <seq> <ns>
# where <ns> is CLOCK_MONOTONIC in nanoseconds ("now at N nsecs" of /proc/timer_list, read with
# the shell's builtin read: no fork, ns resolution; /proc/uptime has only 10 ms and busybox
# date has no %N).
# Console input: a line "STOP" makes the writer finish the write in progress, print
#   STOPPED <disk>=<last acked seq> ...
# and wait (no write in flight) until a line "GO" resumes it ("RESUMED ts=<ns>"); a STOP while
# stopped prints STOPPED again.
export PATH=/bin
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
exec </dev/console >/dev/console 2>&1
echo 1 >/proc/sys/kernel/printk
stty -echo 2>/dev/null

while read -r m; do
  insmod "/mods/$m.ko" || echo "ERR insmod $m"
done </mods/order

DISKS= RING_MIB=4 INTERVAL_MS=20 RUN=run0
for w in $(cat /proc/cmdline); do
  case $w in
    livesnap.disks=*) DISKS=${w#*=} ;;
    livesnap.ring_mib=*) RING_MIB=${w#*=} ;;
    livesnap.interval_ms=*) INTERVAL_MS=${w#*=} ;;
    livesnap.run=*) RUN=${w#*=} ;;
  esac
done
NSLOTS=$((RING_MIB * 256))
SLEEP_S=$(printf '%d.%03d' $((INTERVAL_MS / 1000)) $((INTERVAL_MS % 1000)))

# Fork-free sleep: read with a timeout from a fifo that nobody writes.
mkfifo /tmp/sleep.fifo
exec 3<>/tmp/sleep.fifo
nap() { read -r -t "$1" -u 3 _x; }
idle() { while :; do nap 3600; done; }

IFS=,
set -- $DISKS
unset IFS
LIST=
for d in "$@"; do
  i=0
  while [ ! -b "/dev/$d" ] && [ $i -lt 100 ]; do nap 0.1; i=$((i + 1)); done
  if [ ! -b "/dev/$d" ]; then echo "ERR $d missing"; continue; fi
  sectors=$(cat "/sys/block/$d/size")
  if [ "$sectors" -lt $((NSLOTS * 8)) ]; then echo "ERR $d too small ($sectors sectors)"; continue; fi
  eval "seq_$d=0"
  LIST="$LIST $d"
done
[ -n "$LIST" ] || { echo "ERR no disks"; idle; }

timer() { { read -r _l; read -r _l; read -r _a _b TS _c; } </proc/timer_list; }
stopped_line() {
  line=STOPPED
  for d in $LIST; do eval "line=\"\$line $d=\$((seq_$d - 1))\""; done
  echo "$line"
}
stop() {
  stopped_line
  while [ -e /tmp/stop ]; do
    nap 0.02
    [ -e /tmp/restop ] && { rm -f /tmp/restop; stopped_line; }
  done
  timer
  echo "RESUMED ts=$TS"
}
# Console commands are read by a background reader with a plain blocking read (a read with
# a timeout on the tty can split a line); the writer only tests flag files (no fork).
( while read -r cmd; do
    case $cmd in
      STOP*) if [ -e /tmp/stop ]; then : >/tmp/restop; else : >/tmp/stop; fi ;;
      GO*) rm -f /tmp/stop ;;
    esac
  done ) </dev/console &

# A minimal QEMU guest agent on the virtio port org.qemu.guest_agent.0 (when the domain has
# that channel): it answers guest-sync and guest-ping, and guest-fsfreeze-freeze/-thaw/-status
# by holding the writer (as a frozen file system blocks writes) and printing FROZEN / THAWED.
agent() {
  # read returns end-of-file while no host is connected: keep the port open and poll
  exec 4<>"$1"
  while :; do
  while read -r req <&4; do
    case $req in
      *guest-sync*)
        id=${req##*\"id\"}; id=${id#*:}; id=${id%%[!0-9 ]*}; id=$(echo $id)
        echo "{\"return\": $id}" >&4 ;;
      *guest-fsfreeze-freeze*)
        : >/tmp/frozen; timer; echo "FROZEN ts=$TS"; echo '{"return": 1}' >&4 ;;
      *guest-fsfreeze-thaw*)
        n=0; [ -e /tmp/frozen ] && n=1
        rm -f /tmp/frozen; timer; echo "THAWED ts=$TS"; echo "{\"return\": $n}" >&4 ;;
      *guest-fsfreeze-status*)
        if [ -e /tmp/frozen ]; then st=frozen; else st=thawed; fi
        echo "{\"return\": \"$st\"}" >&4 ;;
      *guest-ping*|*guest-info*) echo '{"return": {}}' >&4 ;;
      *execute*) echo '{"error": {"class": "CommandNotFound", "desc": "not in this agent"}}' >&4 ;;
    esac
  done
  nap 0.05
  done
}
for p in /sys/class/virtio-ports/vport*; do
  [ -e "$p/name" ] || continue
  read -r pname <"$p/name"
  if [ "$pname" = org.qemu.guest_agent.0 ]; then
    agent "/dev/${p##*/}" &
    echo "AGENT /dev/${p##*/}"
  fi
done

read -r CS </sys/devices/system/clocksource/clocksource0/current_clocksource
timer
echo "READY run=$RUN disks=${LIST# } nslots=$NSLOTS interval_ms=$INTERVAL_MS clocksource=$CS ts=$TS"
while :; do
  for d in $LIST; do
    eval "s=\$seq_$d"
    slot=$((s % NSLOTS))
    F="$s-"; F=$F$F; F=$F$F; F=$F$F; F=$F$F; F=$F$F; F=$F$F; F=$F$F; F=$F$F
    H="LSNAP1 $RUN $d $s $slot"
    printf '%-511.511s\n' "$H 0 $F" "$H 1 $F" "$H 2 $F" "$H 3 $F" \
      "$H 4 $F" "$H 5 $F" "$H 6 $F" "$H 7 $F" >/tmp/rec
    if dd if=/tmp/rec of="/dev/$d" bs=4096 count=1 seek=$slot conv=notrunc,fsync \
        oflag=direct 2>/tmp/dd.err; then
      timer
      echo "ACK $d $s $TS"
      eval "seq_$d=$((s + 1))"
    else
      timer
      echo "ERR $d $s $TS dd failed: $(cat /tmp/dd.err)"
      nap 0.5
    fi
    [ "$INTERVAL_MS" -gt 0 ] && nap "$SLEEP_S"
    while [ -e /tmp/frozen ]; do nap 0.005; done
    [ -e /tmp/stop ] && stop
  done
done
