"""The demo's job domain: the ledger, the kinds of job, publishing (the outbox) and the stranded-job sweep.

Used by web (app/), the worker and beat (tasks/); depends only on core/ and stopright/.
"""
