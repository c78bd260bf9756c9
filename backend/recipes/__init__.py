"""Templates built from a recipe (`wrenn-tui template build NAME -f FILE`).

parser.py   the recipe format (a Dockerfile subset plus START and READY), checked whole
            before any capsule starts: every error names its line
context.py  COPY sources: resolved inside the context dir (never out of it, by `..` or a
            symlink), hashed for the layer cache, packed as a tar for envd's file API
builder.py  the build: a capsule from FROM (or from the longest cached prefix), each step
            through envd, each step's result a hidden template (a layer), the last one
            installed under NAME; `prune` removes layers no template uses
"""
