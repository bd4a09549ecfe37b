# Sourced by scripts/start: honcho's output through a relay when it goes to a pipe.
#
# honcho prints "SIGINT received" before it signals anyone. In `scripts/start | tee log`
# a Ctrl+C kills tee too, so that print meets a broken pipe: honcho raises, never
# signals its processes, and hangs at exit waiting for them (the same after `| head`
# has read enough). The relay sits between honcho and the pipe: it ignores the stop
# signals and SIGPIPE, and once its own reader is gone it keeps reading and drops the
# rest, so honcho never meets a broken pipe. It ends when honcho's output does.
relay() {
  trap '' INT TERM QUIT PIPE
  cat 2>/dev/null || true
  exec cat >/dev/null
}
