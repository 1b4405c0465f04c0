#!/usr/bin/env bash
# bench/device/poll.sh NAME SECONDS: wait up to SECONDS for the background command NAME (bg.sh), then print its
# log's tail and pack the run folders named in TAR (space-separated, under /tmp/runs) into $OUT/NAME.tgz, so
# what it did so far comes back even if the machine goes away before the next call. Call it back to back.
set -u
name=$1 seconds=$2
TAR=${TAR:-$(sed -n 's/^# QUEUE_FOLDERS: //p' bench/device/queue.sh)}  # by default the queue's folders
deadline=$((SECONDS + seconds))
while [ ! -f "/tmp/bg/$name.rc" ] && [ $SECONDS -lt $deadline ]; do sleep 5; done
tail -n 40 "/tmp/bg/$name.log"
if [ -f "/tmp/bg/$name.rc" ]; then echo "$name finished: exit $(cat "/tmp/bg/$name.rc")"; else echo "$name still running"; fi
if [ -n "${TAR:-}" ] && [ -n "${OUT:-}" ]; then
  dirs=$(cd /tmp/runs 2>/dev/null && for d in $TAR; do [ -e "$d" ] && echo "$d"; done)
  # weights that do not travel (full-weight GRPO checkpoints and models) stay behind
  [ -n "$dirs" ] && tar -C /tmp/runs -czf "$OUT/$name.tgz" --exclude='checkpoint-*' --exclude='*/model/*' $dirs
  cp "/tmp/bg/$name.log" "$OUT/$name.log"
fi
