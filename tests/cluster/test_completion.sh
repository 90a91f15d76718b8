#!/usr/bin/env bash
# client/dsctl.bash-completion: source it, fill COMP_WORDS/COMP_CWORD as bash would, call
# _dsctl and compare COMPREPLY with what the build's dsctl documents. The expected lists are
# read from `dsctl --help` / `dsctl CMD --help` here with awk and bash regexes, not with the
# completion's own sed/grep, so a parsing slip in either shows as a difference.
set -u
: "${DS_BUILD:?}" "${DS_ROOT:?}"
DSCTL="$DS_BUILD/client/dsctl"
[ -x "$DSCTL" ] || { echo "FAIL: no $DSCTL (build dsctl first)"; exit 1; }
# shellcheck source=../../client/dsctl.bash-completion
source "$DS_ROOT/client/dsctl.bash-completion"

fails=0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# complete WORD...: the last word is the one being completed; prints COMPREPLY sorted, one a line
complete_words() {
    COMP_WORDS=("$DSCTL" "$@")
    COMP_CWORD=$#
    COMP_LINE="${COMP_WORDS[*]}"
    COMP_POINT=${#COMP_LINE}
    COMPREPLY=()
    local prev=${COMP_WORDS[COMP_CWORD - 1]}
    _dsctl "$DSCTL" "${COMP_WORDS[COMP_CWORD]}" "$prev"
    printf '%s\n' "${COMPREPLY[@]}" | sed '/^$/d' | sort
}

# expect NAME EXPECTED ACTUAL: both newline-separated lists
expect() {
    if [ "$2" == "$3" ]; then
        echo "ok: $1"
    else
        echo "FAIL: $1"
        diff <(echo "$2") <(echo "$3") | sed 's/^/    /'
        fails=$((fails + 1))
    fi
}

# commands as `dsctl --help` lists them: the indented lines after "commands:"
commands=$("$DSCTL" --help | awk '/^commands:/ {in_list = 1; next}
                                  in_list && NF == 0 {exit}
                                  in_list {print $1}' | sort)
[ -n "$commands" ] || { echo "FAIL: dsctl --help lists no commands"; exit 1; }
for c in placement plan generate status; do
    grep -qx "$c" <<<"$commands" || { echo "FAIL: dsctl --help does not list $c"; fails=$((fails + 1)); }
done

# (a) "" after dsctl: exactly the commands
expect "'dsctl <TAB>' offers exactly the commands of dsctl --help" "$commands" "$(complete_words "")"
# ... and after a global option too
expect "'dsctl --verbose <TAB>' offers the commands" "$commands" "$(complete_words --verbose "")"

# (b) "--" after each command: every long option its --help names
documented_options() {
    local text re='(--[a-z][a-z0-9-]*)' out=()
    text=$("$DSCTL" "$1" --help 2>&1)
    while [[ $text =~ $re ]]; do
        out+=("${BASH_REMATCH[1]}")
        text=${text#*"${BASH_REMATCH[1]}"}
    done
    printf '%s\n' "${out[@]}" | sort -u
}
while read -r c; do
    want=$(documented_options "$c")
    case $c in placement | plan | generate)
        [ "$(wc -l <<<"$want")" -ge 4 ] || { echo "FAIL: $c --help documents too few options"; fails=$((fails + 1)); } ;;
    esac
    expect "'dsctl $c --<TAB>' offers every option of dsctl $c --help" "$want" \
        "$(complete_words "$c" --)"
done <<<"$commands"
# options already typed do not stop option completion
expect "'dsctl placement --json --ex<TAB>'" "--explain" "$(complete_words placement --json --ex)"

# (c) a prefix: "pl" gives placement and plan only
expect "'dsctl pl<TAB>' gives placement and plan" "$(printf 'placement\nplan')" "$(complete_words pl)"
expect "'dsctl --ver<TAB>' gives the global options" "$(printf -- '--verbose\n--version')" \
    "$(complete_words --ver)"

# file and directory arguments
mkdir "$tmp/specs.d"
touch "$tmp/spec.json" "$tmp/logits.bin"
expect "'dsctl plan --cluster DIR/sp<TAB>' gives files and directories" \
    "$(printf '%s\n' "$tmp/spec.json" "$tmp/specs.d")" "$(complete_words plan --cluster "$tmp/sp")"
expect "'dsctl plan --cluster=DIR/sp<TAB>' (split at =)" \
    "$(printf '%s\n' "$tmp/spec.json" "$tmp/specs.d")" "$(complete_words plan --cluster = "$tmp/sp")"
expect "'dsctl generate --logits-out DIR/l<TAB>'" "$tmp/logits.bin" \
    "$(complete_words generate --local --logits-out "$tmp/l")"
expect "'dsctl devices --state-dir DIR/s<TAB>' gives directories only" "$tmp/specs.d" \
    "$(complete_words devices --state-dir "$tmp/s")"
expect "'dsctl plan --objective <TAB>'" "$(printf 'latency\nthroughput')" \
    "$(complete_words plan --objective "")"
expect "'dsctl placement --endpoint <TAB>' offers nothing" "" \
    "$(complete_words placement --endpoint "")"

if [ $fails -ne 0 ]; then
    echo "FAIL: $fails completion checks failed"
    exit 1
fi
echo "PASS: dsctl bash completion"
