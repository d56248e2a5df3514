"""Child side, part 3 of 3: the launcher and the supervisor, and ``main`` (see child_setup.py).

Process tree in the namespace modes (engine -> B -> S -> W):
* B, the process the engine starts, enters the namespaces, forks S and waits; when the engine closes the
  lifeline pipe (or dies) B kills S, which takes the whole PID namespace down.
* S, the supervisor, is the namespace's init (pid 1), runs as root (root mode) or is undumpable (userns),
  builds the filesystem view and forks W, the worker (child_worker.py). Only S holds the engine's request and
  reply pipes: the code, in W under another uid (or a nested user namespace), can neither reach them (they are
  closed in W, and /proc/1/fd is not its to open) nor write what S sends.
Per snippet S sends W a fresh token and the code, then watches: the CPU time of every process of the sandbox
(the per-snippet CPU limit), the wall clock less the time the snippet's processes waited for a CPU (the
per-snippet wall limit, which a busy neighbour cannot use up), W's "done" report (validated field by field) and
W's stop. A limit the report claims (memory_limit, process_limit) comes with what the kernel saw (W's VmPeak, the
most tasks alive), so a report forged by the code cannot claim one it did not reach. Before it replies it
kills every other process, and if W has a thread left, W itself (the session is then replaced): when the
engine reads the reply, nothing the snippet started is running. In mode "none" S is the process the engine
starts, a child subreaper, so processes that double-fork stay its descendants.
"""

_DONE_STATUSES = ("ok", "error", "timeout", "memory_limit", "process_limit")
_EXC_KINDS = ("timeout", "exception", "base")
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _run_delay(pid):
    """Nanoseconds process `pid` (its main thread) has spent runnable but waiting for a CPU, or None."""
    try:
        with open("/proc/%d/schedstat" % pid, "rb") as f:
            return int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _stat_fields(pid):
    """Fields of /proc/<pid>/stat after the command name (index 0 is the state), or None."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rfind(b")") + 2:].split()


class Supervisor:
    def __init__(self, cfg, worker, code_w, done_r):
        self.cfg, self.worker, self.code_w, self.done_r = cfg, worker, code_w, done_r
        self.ns = cfg["mode"] != "none"
        self.me = os.getpid()
        self.stopped = False  # the worker is stopped between two snippets
        self.wake_r, wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *a: None)

    # -- the sandbox's processes ------------------------------------------------------------------------------
    def processes(self):
        """pid -> stat fields of every process of the sandbox except this supervisor."""
        table = {}
        for name in os.listdir("/proc"):
            if name.isdigit() and int(name) != self.me:
                fields = _stat_fields(int(name))
                if fields is not None:
                    table[int(name)] = fields
        if self.ns:
            return table
        # No PID namespace: keep our descendants only (orphans come back to us: we are a subreaper).
        mine, frontier = {}, [self.me]
        while frontier:
            parent = frontier.pop()
            for pid, fields in table.items():
                if int(fields[1]) == parent and pid not in mine:
                    mine[pid] = fields
                    frontier.append(pid)
        return mine

    def cpu_total(self, table=None):
        """Seconds of CPU used by the sandbox's processes, alive or reaped (not by this supervisor)."""
        table = self.processes() if table is None else table
        ticks = sum(int(f[11]) + int(f[12]) + int(f[13]) + int(f[14]) for f in table.values())
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        return ticks / _CLK_TCK + ru.ru_utime + ru.ru_stime

    def sample(self, waits):
        """(CPU seconds so far, seconds the snippet's most-delayed process has waited for a CPU since it was first
        seen, tasks alive now). ``waits``: pid -> [first, last] run-queue delay in ns (/proc/<pid>/schedstat),
        kept across samples so that processes that have ended still count."""
        table = self.processes()
        for pid in table:
            delay = _run_delay(pid)
            if delay is not None:
                seen = waits.setdefault(pid, [delay, delay])
                seen[1] = delay
        starved = max((last - first for first, last in waits.values()), default=0) / 1e9
        tasks = sum(int(f[17]) for f in table.values() if f[0] != b"Z")
        return self.cpu_total(table), starved, tasks

    def vm_peak(self):
        """The worker's peak address space in bytes (VmPeak: the kernel's own high-water mark), or 0."""
        try:
            with open("/proc/%d/status" % self.worker, "rb") as f:
                for line in f:
                    if line.startswith(b"VmPeak:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        return 0

    def reap(self):
        """Reaps what has ended; returns the worker's wait status if it ended, else None."""
        worker_status = None
        while True:
            try:
                pid, st = os.waitpid(-1, os.WNOHANG | os.WUNTRACED)
            except ChildProcessError:
                return worker_status
            if pid == 0:
                return worker_status
            if pid == self.worker:
                if os.WIFSTOPPED(st):
                    self.stopped = True
                else:
                    worker_status = st
            elif os.WIFSTOPPED(st):
                os.kill(pid, signal.SIGKILL)  # an orphan stopped itself: it is killed at the end anyway

    def kill_others(self):
        """Kills every process of the sandbox but the worker; returns how many were alive."""
        killed = 0
        for _ in range(200):
            alive = [p for p, f in self.processes().items() if p != self.worker and f[0] != b"Z"]
            if not alive:
                return killed
            killed = max(killed, len(alive))
            for pid in alive:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.reap()
            select.select([], [], [], 0.005)
        return killed

    def kill_all(self):
        if self.ns:
            try:
                os.kill(-1, signal.SIGKILL)  # from init: every other process of the namespace
            except ProcessLookupError:
                pass
        else:
            for pid in self.processes():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        while True:
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                return
            except InterruptedError:
                continue

    # -- one snippet --------------------------------------------------------------------------------------------
    def _parse_done(self, buf, token):
        """The worker's report, validated; (report, None) or (None, why it is not acceptable)."""
        if len(buf) < 4:
            return None, "the snippet's report was cut short"
        (n,) = struct.unpack("<I", buf[:4])
        if n > FRAME_MAX or len(buf) != 4 + n:
            return None, "the worker's reply channel carried %d bytes beyond one report" % (len(buf) - 4 - n)
        try:
            msg = json.loads(buf[4:].decode("utf-8"))
        except ValueError:
            return None, "the snippet's report is not valid JSON"
        if not isinstance(msg, dict) or set(msg) != {"token", "status", "exit_code", "exc"}:
            return None, "the snippet's report has the wrong fields"
        exc = msg["exc"]
        if exc is not None and not (isinstance(exc, list) and len(exc) == 3 and all(isinstance(x, str) for x in exc)
                                    and exc[0] in _EXC_KINDS):
            return None, "the snippet's report has an invalid exception field"
        if msg["token"] != token:
            return None, "the snippet's report does not carry this snippet's token (forged)"
        if msg["status"] not in _DONE_STATUSES or type(msg["exit_code"]) is not int:
            return None, "the snippet's report has an invalid status or exit code"
        return msg, None

    def run(self, code):
        """Runs one snippet; returns the reply for the engine (a dict; reply["state_lost"]: the session ends)."""
        cfg = self.cfg
        token = os.urandom(16).hex()
        if self.stopped:
            self.stopped = False
            os.kill(self.worker, signal.SIGCONT)
        waits = {}
        base, _, _ = self.sample(waits)
        self.peak_tasks = 0
        start = time.monotonic()
        sent = write_frame(self.code_w, token.encode() + code)
        buf, done_open = b"", True
        tick = 0.02 if self.ns else 0.05
        while True:
            # Woken by the report, by SIGCHLD (the worker stopped or died: the wakeup pipe), or by the tick.
            ready, _, _ = select.select([self.done_r, self.wake_r] if done_open else [self.wake_r], [], [], tick)
            if self.wake_r in ready:
                try:
                    os.read(self.wake_r, 4096)
                except BlockingIOError:
                    pass
            if self.done_r in ready:
                chunk = os.read(self.done_r, FRAME_MAX)
                if chunk:
                    buf += chunk
                else:
                    done_open = False
                if len(buf) > FRAME_MAX + 4:
                    return self._lost("protocol_error", "the snippet flooded the worker's reply channel", base)
            status = self.reap()
            cpu, starved, tasks = self.sample(waits)
            cpu -= base
            self.peak_tasks = max(self.peak_tasks, tasks)
            if status is not None:
                return self._lost("exited", None, base, exit_code=os.waitstatus_to_exitcode(status))
            if cpu > cfg["cpu_per_snippet"]:
                return self._lost("cpu_limit", "CPU time over %ss" % cfg["cpu_per_snippet"], base)
            # The wall clock a neighbour cannot steal: time spent waiting for a CPU is not the snippet's.
            charged = time.monotonic() - start - starved
            if charged > cfg["wall_per_snippet"]:
                return self._lost("timeout", "wall clock over %gs" % cfg["wall_per_snippet"] + (
                    " (not counting %.1fs spent waiting for a CPU)" % starved if starved >= 0.05 else ""), base)
            if not sent:
                continue  # the code pipe is gone: the worker is exiting, wait for its status
            if self.stopped:
                os.set_blocking(self.done_r, False)
                try:
                    while chunk := os.read(self.done_r, FRAME_MAX):
                        buf += chunk
                        if len(buf) > FRAME_MAX + 4:
                            break
                except BlockingIOError:
                    pass
                os.set_blocking(self.done_r, True)
                if not buf:
                    return self._lost("protocol_error", "the worker stopped without reporting its snippet "
                                      "(the code stopped it or broke its reply channel)", base)
                msg, why = self._parse_done(buf, token)
                if msg is None:
                    return self._lost("protocol_error", why, base)
                return self._finish(msg, base)

    def _finish(self, msg, base):
        killed = self.kill_others()
        try:
            threads = len(os.listdir("/proc/%d/task" % self.worker))
        except OSError:
            threads = 1
        # The worker's report is the code's to forge (it runs in the worker): a limit it claims is checked against
        # what the kernel saw. The engine accepts memory_limit on vm_peak or on its memory cgroup's events, and
        # process_limit on peak_tasks; otherwise the snippet is the code's own error.
        reply = {"event": "done", "status": msg["status"], "exit_code": msg["exit_code"], "exc": msg["exc"],
                 "cpu": self.cpu_total() - base, "killed_processes": killed, "threads_left": threads - 1,
                 "state_lost": threads > 1, "vm_peak": self.vm_peak(),
                 "peak_tasks": max(self.peak_tasks, killed + threads)}
        if threads > 1:
            self.kill_all()  # a thread of the snippet is still there: the worker goes, with its state
        return reply

    def _lost(self, event, error, base, exit_code=None):
        cpu = self.cpu_total() - base
        self.kill_all()
        return {"event": event, "error": error, "exit_code": exit_code, "cpu": cpu, "state_lost": True}


def _launcher(cfg, child):
    """B: waits for S; kills it when the engine closes the lifeline. Never returns."""
    life_fd = cfg["life_fd"]
    try:
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *a: None)
        while True:
            pid, st = os.waitpid(child, os.WNOHANG)
            if pid:
                os._exit(os.waitstatus_to_exitcode(st) & 0xFF if os.WIFEXITED(st) else 70)
            ready, _, _ = select.select([life_fd, wake_r], [], [])
            if life_fd in ready:  # EOF: the engine ended the run, or died
                os.kill(child, signal.SIGKILL)
                os.waitpid(child, 0)
                os._exit(71)
            if wake_r in ready:
                os.read(wake_r, 512)
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(72)


def main():
    cfg = json.loads(sys.argv[1])
    # Into the session's cgroup(s) before anything else: every process of the sandbox descends from this one.
    for path in cfg["cgroup_procs"]:
        try:
            with open(path, "w") as f:
                f.write(str(os.getpid()))
        except OSError as e:
            fail_setup(cfg, "joining the session's cgroup %s: %s" % (path, e))
    code_fds = []  # the worker's own groups: opened now (the paths vanish with the new root), written by it
    for path in cfg["cgroup_code_procs"]:
        try:
            code_fds.append(os.open(path, os.O_WRONLY | os.O_CLOEXEC))
        except OSError as e:
            fail_setup(cfg, "opening the session's cgroup %s: %s" % (path, e))
    cfg["code_cgroup_fds"] = code_fds
    # Python's one default handler: a signal the code may send us (same kernel uid in userns mode) must not
    # raise KeyboardInterrupt here. As a PID namespace's init we get no signal without a handler from inside.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    req_r, rep_w = cfg["req_fd"], cfg["rep_fd"]
    ns = cfg["mode"] != "none"
    try:
        if ns:
            owner = enter_namespaces(cfg)
            s = os.fork()
            if s:
                for fd in [req_r, rep_w, *code_fds]:
                    os.close(fd)
                _launcher(cfg, s)
            os.close(cfg["life_fd"])
            c_call("prctl", PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)  # dies with B
            if cfg["mode"] == "root":
                owner = (cfg["uid"], cfg["gid"])
            build_root(cfg, owner)
        else:
            c_call("prctl", PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        # Undumpable: a same-uid process without privileges over us cannot open /proc/<us>/fd or ptrace us.
        c_call("prctl", PR_SET_DUMPABLE, 0, 0, 0, 0)
    except (OSError, SetupError) as e:
        fail_setup(cfg, str(e))
    code_r, code_w = os.pipe()
    done_r, done_w = os.pipe()
    worker = os.fork()
    if worker == 0:
        for fd in (req_r, rep_w, code_w, done_r):
            os.close(fd)
        if not ns:
            c_call("prctl", PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        worker_main(cfg, code_r, done_w)
    for fd in [code_r, done_w, *code_fds]:
        os.close(fd)
    sup = Supervisor(cfg, worker, code_w, done_r)
    if not ns:  # no namespace to tear down: the engine asks us to kill our descendants
        signal.signal(signal.SIGTERM, lambda *a: (sup.kill_all(), os._exit(0)))
    while True:
        code = read_frame(req_r)
        if code is None:  # the engine closed the session
            sup.kill_all()
            os._exit(0)
        reply = sup.run(code)
        if not write_frame(rep_w, json.dumps(reply).encode()) or reply["state_lost"]:
            sup.kill_all()
            os._exit(0)
