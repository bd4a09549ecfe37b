"""Imported into a worker by a test (``celery worker --include``): a library's thread that never ends.

A non-daemon thread (a metrics exporter, say) makes the interpreter's exit
wait for it for ever, after the worker has closed everything.
"""

import threading

threading.Thread(target=threading.Event().wait, name="never-ends", daemon=False).start()
