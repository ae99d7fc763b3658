"""Schemathesis hooks for .ci/schemathesis.sh.

An import body is documented as a string under text/csv and application/x-ndjson.
Schemathesis sends any text/* string as UTF-8 on its own; JSON lines are text too, so
they go on the wire the same way.
"""

import schemathesis

schemathesis.serializer.alias("application/x-ndjson", "text/plain")
