"""Child side, part 2 of 3: the worker, the one process that runs the untrusted code (see child_setup.py).

It holds the session's globals and runs one snippet per frame read from its supervisor: the frame is a
32-character per-snippet token followed by the code. After each snippet it flushes its output, writes a short
"done" frame carrying the token, and stops itself (SIGSTOP): between snippets no thread of it can run, and the
supervisor checks that it is stopped, alone and single-threaded before it answers the engine.

The worker never holds the engine's pipes (the supervisor closes them in it before any code runs), so
everything the code can touch here is its own snippet's report: a forged or garbled report, a closed pipe or a
stop without a report fails that snippet alone (the supervisor validates every field).
Exec semantics are those of GenPRM's released CodeExecutor (genprm_inference.py L35-64, RyanLiu112/GenPRM 590bc94),
which the checkpoints were trained on: ``exec(code, namespace)`` of the code string (file name "<string>", so a
SyntaxError reads "... (<string>, line N)"), in one dict per session that starts empty (so ``__name__`` is the
builtins module's, "builtins"); stdout captured as ``redirect_stdout`` does (``sys.stdout`` is replaced for the
snippet; writes to file descriptor 1, ``sys.__stdout__`` and subprocesses' stdout go to stderr instead); a
``TimeoutError("Code execution timed out")`` raised inside the snippet by a wall-clock timer (real time less the
time the worker waited for a CPU, so a busy neighbour cannot cause it), as the release's
``signal.alarm`` does, so the namespace survives (the supervisor's kill stays the backstop). The escaped
exception, verbatim (its type name and ``str()``), travels in the report.
Uses the helpers of child_setup.py, with which it is concatenated.
"""
import fcntl
import io

_forks = [0]
_armed, _fired = [False], [False]  # the interruption timer: armed while the snippet runs; fired
_interrupt_s = [0.0]
INTERRUPT_MESSAGE = "Code execution timed out"  # genprm_inference.py, timeout.handle_timeout
EXC_TEXT_MAX = 8000  # characters of an exception's str() carried in the report (the frame is <= 64 KiB)
_dumps = json.dumps  # bound before any code runs


def _count_forks(event, args):
    if event in ("os.fork", "os.forkpty", "os.posix_spawn", "subprocess.Popen", "os.system",
                 "_thread.start_new_thread"):
        _forks[0] += 1


def _classify(cfg, exc):
    """(status, exit code) for an exception that escaped the code."""
    if isinstance(exc, MemoryError):
        return "memory_limit", cfg["exit_memory"]
    if _forks[0] and (isinstance(exc, BlockingIOError) or
                      (isinstance(exc, RuntimeError) and "can't start new thread" in str(exc))):
        return "process_limit", cfg["exit_nproc"]
    return "error", 1


_clock = [0.0, 0]  # when the interruption timer was armed: (monotonic seconds, own run-queue delay in ns)


def _own_run_delay():
    """Nanoseconds this process's main thread has waited for a CPU (/proc/self/schedstat), or 0."""
    try:
        with open("/proc/self/schedstat", "rb") as f:
            return int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _arm_interrupt(cfg):
    _clock[0], _clock[1] = time.monotonic(), _own_run_delay()
    _armed[0] = True
    signal.setitimer(signal.ITIMER_REAL, cfg["interrupt_s"])


def _on_alarm(signum, frame):
    if _armed[0]:
        # The snippet's own time: real time less what it spent waiting for a CPU, so that a busy neighbour cannot
        # make it time out (the supervisor's wall limit is counted the same way). Not yet due: wait the rest.
        left = _interrupt_s[0] - (time.monotonic() - _clock[0] - (_own_run_delay() - _clock[1]) / 1e9)
        if left > 0.005:
            signal.setitimer(signal.ITIMER_REAL, left)
            return
        _armed[0], _fired[0] = False, True
        raise TimeoutError(INTERRUPT_MESSAGE)


def _exc_info(e):
    """[kind, type name, str(e)]: kind "timeout" (any TimeoutError, as the release's `except TimeoutError`),
    "exception" (an Exception) or "base" (SystemExit and the other BaseExceptions the release lets escape)."""
    try:
        text = str(e)
    except BaseException:  # the code's own __str__ failed
        text = "<str() of the exception failed>"
    kind = "timeout" if isinstance(e, TimeoutError) else ("exception" if isinstance(e, Exception) else "base")
    return [kind, type(e).__name__, text[:EXC_TEXT_MAX]]


def _run_snippet(cfg, code, ns, main_pid, capture):
    """(status, exit code, exception info or None) of one snippet."""
    exc = None
    signal.signal(signal.SIGALRM, _on_alarm)
    _fired[0] = False
    sys.stdout = capture  # redirect_stdout
    try:
        _interrupt_s[0] = cfg["interrupt_s"]
        _arm_interrupt(cfg)
        try:
            exec(code, ns)
        finally:
            _armed[0] = False
            signal.setitimer(signal.ITIMER_REAL, 0)
        status, rc = "ok", 0
    except SystemExit as e:
        exc = _exc_info(e)
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
        status = "ok" if rc == 0 else "error"
    except BaseException as e:  # the code's exception, whatever it is, ends its snippet only
        status, rc = _classify(cfg, e)
        if status == "error" and _fired[0] and isinstance(e, TimeoutError):
            status = "timeout"  # interrupted in-process: the namespace is kept
        exc = _exc_info(e)
        try:  # the traceback starts at the code, not at this bootstrap
            traceback.print_exception(type(e), e, e.__traceback__.tb_next)
        except BaseException:
            os.write(2, ("%s\n" % type(e).__name__).encode(errors="replace"))
    if _getpid() != main_pid:  # a child forked by the code must not continue into the worker loop
        os._exit(rc & 0xFF)
    for stream in (capture, sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except BaseException:
            pass
    sys.stdout = sys.__stdout__
    return status, rc, exc


def _settle_threads():
    """Threads the code joined may still be exiting in the kernel: give them a moment (not longer)."""
    if threading.active_count() != 1:
        return
    for _ in range(50):
        try:
            if len(os.listdir("/proc/self/task")) <= 1:
                return
        except OSError:
            return
        select.select([], [], [], 0.001)


def _disarm_timers():
    """Timers the snippet armed (signal.alarm, setitimer) would fire in the next snippet: cancel them."""
    for which in (signal.ITIMER_REAL, signal.ITIMER_VIRTUAL, signal.ITIMER_PROF):
        try:
            signal.setitimer(which, 0)
        except (OSError, ValueError, TypeError):
            pass


def _reap_children():
    """Zombies of processes the supervisor killed between snippets (they count against RLIMIT_NPROC)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def worker_main(cfg, code_r, done_w):
    """Runs snippets until the supervisor closes the code pipe. Never returns."""
    try:
        for fd in cfg["code_cgroup_fds"]:  # into the session's CPU group, before any code (children follow)
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
        drop_privileges(cfg)
    except (OSError, SetupError) as e:
        fail_setup(cfg, str(e))
    del sys.argv[1:]  # the configuration is not the code's business
    main_pid = os.getpid()
    sys.addaudithook(_count_forks)
    # redirect_stdout: the snippet's sys.stdout writes to the stdout pipe through a descriptor of its own, at the
    # top of RLIMIT_NOFILE (above the reply pipe); fd 1, and with it sys.__stdout__, os.write(1, ...) and
    # subprocesses, goes to stderr, as the release's fd 1 went to its console and not into the code output.
    top = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    out_fd = fcntl.fcntl(1, fcntl.F_DUPFD, top - 1 if 4 < top <= 4096 else 1023)
    os.dup2(2, 1)
    capture = io.TextIOWrapper(io.FileIO(out_fd, "w", closefd=False), encoding="utf-8", write_through=True)
    ns = {}  # the release's CodeExecutor.namespace: __name__ resolves to the builtins module's
    cpu_step = cfg["cpu_per_snippet"]
    while True:
        frame = read_frame(code_r)
        if frame is None or len(frame) < 32:
            # The supervisor never closes this pipe while we live (it kills us first): the code did.
            os._exit(cfg["exit_channel"])
        token, code = frame[:32], frame[32:].decode("utf-8", "surrogatepass")
        _reap_children()
        # RLIMIT_CPU as a backstop for this process; the supervisor's per-snippet accounting is the real limit.
        used = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
        hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
        soft = int(used) + 2 + cpu_step
        try:
            resource.setrlimit(resource.RLIMIT_CPU, (soft if hard < 0 else min(soft, hard), hard))
        except (OSError, ValueError):
            pass
        _forks[0] = 0
        status, rc, exc = _run_snippet(cfg, code, ns, main_pid, capture)
        _disarm_timers()
        _settle_threads()
        # Formatted by hand: the code may have replaced json.dumps (it would only garble its own report).
        try:
            exc_json = _dumps(exc)
        except BaseException:  # the code broke json's machinery: its own report suffers, nothing else
            exc_json = "null"
        msg = '{"token": "%s", "status": "%s", "exit_code": %d, "exc": %s}' % (token.decode("ascii"), status,
                                                                            int(rc), exc_json)
        if not write_frame(done_w, msg.encode()):
            os._exit(cfg["exit_channel"])  # the code closed or broke the reply pipe
        _kill(main_pid, signal.SIGSTOP)
