"""What a process manager does to one unit when it stops it: a pure state machine.

A *unit* is what a manager starts and stops as one thing: a systemd service,
a Heroku dyno, a container, a supervisord program, or a whole manager
(``honcho start``) run as one. Its :class:`Policy` says which processes get
the stop signal, how long the manager waits, who gets SIGKILL after that, and
what happens when the unit's main process exits while others of the unit are
still running. :func:`step` is called by the engine every poll with what it
sees, and returns the signals to send now. It holds no processes, so the unit
tests drive it with made-up states and check what is sent to whom and when.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field

# Recipients of a signal, resolved by the engine against the live processes of a unit.
MAIN = "main"  # the unit's main process (PID 1 of its PID namespace for a container)
TREE = "tree"  # every process of the unit (systemd's control group, a dyno, a namespace)
GROUP = "group"  # the main process's process group (supervisord's stopasgroup, a tty's ^C)
REST = "rest"  # every process of the unit but the main one

# What the manager does when the main process has exited and others of the unit remain.
DONE = "done"  # nothing: stopped (KillMode=process leaves them; a PID namespace's kernel killed them)
TERM_REST = "term-rest"  # systemd control-group: the stop signal to the rest, a new timeout, SIGKILL
KILL_REST = "kill-rest"  # systemd mixed: SIGKILL to the rest at once
WAIT = "wait"  # wait for the rest until the timeout, then SIGKILL them (Heroku)


@dataclass(frozen=True)
class Policy:
    stop_signal: int = signal.SIGTERM
    signal_to: str = MAIN
    timeout: float = 10.0  # seconds from the start of the stop (a preStop sleep included), then SIGKILL
    kill_to: str = TREE
    pre_stop: float = 0.0  # Kubernetes: a preStop hook's sleep before the stop signal
    on_main_exit: str = DONE
    after: tuple[str, ...] = ()  # begin the stop once these units have stopped (systemd ordering)


@dataclass(frozen=True)
class Send:
    to: str  # MAIN, TREE, GROUP or REST
    signum: int
    why: str


@dataclass
class UnitState:
    """Times (monotonic seconds) at which the manager did or saw each step; None: not yet."""

    begun: float | None = None  # the stop began (after the units it waits for)
    signalled: float | None = None  # the stop signal was sent
    main_exit: float | None = None  # the main process was seen gone
    rest_signalled: float | None = None  # systemd control-group: the rest got the stop signal
    killed: float | None = None  # SIGKILL was sent
    done: float | None = None  # the manager counts the unit stopped
    sent: list[tuple[float, Send]] = field(default_factory=list)


def step(policy: Policy, st: UnitState, now: float, *, main_alive: bool, rest_alive: bool,
         deps_done: bool = True) -> list[Send]:
    """The signals the manager sends now, given what it sees; updates ``st``.

    ``rest_alive``: processes of the unit other than the main one are running.
    ``deps_done``: every unit named in ``policy.after`` has stopped.
    """
    out: list[Send] = []

    def send(to: str, signum: int, why: str) -> None:
        s = Send(to, signum, why)
        st.sent.append((now, s))
        out.append(s)

    if st.done is not None:
        return out
    if st.begun is None:
        if not deps_done:
            return out
        st.begun = now
    if st.signalled is None:
        if not main_alive and not rest_alive:
            st.done = now  # gone before its turn came
            return out
        if now < st.begun + policy.pre_stop:
            return out
        st.signalled = now
        send(policy.signal_to, policy.stop_signal, "stop")
    deadline = st.begun + policy.timeout
    if main_alive:
        if st.killed is None and now >= deadline:
            st.killed = now
            send(policy.kill_to, signal.SIGKILL, "timeout")
        return out
    if st.main_exit is None:
        st.main_exit = now
    if not rest_alive or policy.on_main_exit == DONE:
        st.done = now
        return out
    if st.killed is not None:
        return out  # SIGKILL sent: waiting for the kernel
    if policy.on_main_exit == KILL_REST:
        st.killed = now
        send(REST, signal.SIGKILL, "main process exited")
    elif policy.on_main_exit == TERM_REST:
        if st.rest_signalled is None:
            st.rest_signalled = now
            send(REST, policy.stop_signal, "main process exited")
        elif now >= st.rest_signalled + policy.timeout:
            st.killed = now
            send(REST, signal.SIGKILL, "timeout")
    elif now >= deadline:  # WAIT
        st.killed = now
        send(REST, signal.SIGKILL, "timeout")
    return out
