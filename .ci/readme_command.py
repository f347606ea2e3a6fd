"""Print one of the README's quick-start commands: `demo` (the first) or `test` (the second).

The README marks each with an HTML comment (<!-- command:demo --> / <!-- command:test -->) followed
by a fenced code block; the command is that block's content, lines joined."""
import pathlib
import re
import sys

which = sys.argv[1] if len(sys.argv) > 1 else "test"
readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
m = re.search(r"<!-- command:%s -->\s*```[a-z]*\n(.*?)```" % re.escape(which), readme, re.S)
if not m:
    sys.exit(f"README.md has no <!-- command:{which} --> block")
print(" ".join(line.rstrip("\\").strip() for line in m.group(1).strip().splitlines()))
