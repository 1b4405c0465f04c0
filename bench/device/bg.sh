#!/usr/bin/env bash
# bench/device/bg.sh NAME SECONDS 'COMMAND': start COMMAND in the background on the GPU machine (it outlives this
# call, not the machine), then watch it as poll.sh does for SECONDS. Its output goes to /tmp/bg/NAME.log.
set -u
name=$1 seconds=$2 command=$3
. bench/device/env.sh
mkdir -p /tmp/bg
if [ -f "/tmp/bg/$name.pid" ] && kill -0 "$(cat "/tmp/bg/$name.pid")" 2>/dev/null; then
  echo "$name is already running"
else
  rm -f "/tmp/bg/$name.rc"
  setsid nohup bash -c "$command; echo \$? > /tmp/bg/$name.rc" > "/tmp/bg/$name.log" 2>&1 < /dev/null &
  echo $! > "/tmp/bg/$name.pid"
fi
exec bash bench/device/poll.sh "$name" "$seconds"
