# shellcheck shell=bash
# Helpers shared by the launch scripts. Sourced, not run.

# Prints a command so that it can be pasted back into a shell.
show_cmd() {
  local out=() a
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then out+=("$a"); else out+=("${a@Q}"); fi
  done
  echo "${out[*]}"
}

# Runs a command (echoing it to stderr first), or with DRY_RUN=1 only prints it, on stdout.
run_cmd() {
  if [ "${DRY_RUN:-0}" = 1 ]; then
    show_cmd "$@"
  else
    echo "+ $(show_cmd "$@")" >&2
    "$@"
  fi
}

# Prints a script's header comment (from line 2 to the first line that is not a comment) as its usage.
print_usage() {
  awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$1"
}
