"""Child side, part 1 of 3: shared helpers, namespaces, the filesystem view and the privilege drop.

NOT imported by the engine. prmkern/sandbox/bootstrap.py concatenates child_setup.py, child_worker.py and
child_supervisor.py into one program that a fresh ``python -I`` runs (stdlib only: nothing else is importable
once the filesystem view is in place). The configuration arrives as JSON in argv[1] and is read by ``main``.

What this part does, in the process that becomes the sandbox's supervisor:
* ``enter_namespaces``: new user (userns mode), mount, network, PID, IPC and UTS namespaces.
* ``build_root``: a new root on a tmpfs holding read-only binds of exactly the directories the interpreter
  reads (its prefixes, sys.path, the system library directories), a few device nodes, private /tmp and
  /dev/shm (bounded in bytes and inodes), a fresh /proc for the PID namespace; then pivot_root and detach the old
  root, so nothing else of the host (project, home, model files, UNIX sockets under /run or /tmp) has a path in
  the sandbox; then ``limit_ipc`` bounds the namespace's SysV shared memory.
* ``drop_privileges`` (in the worker): limits, then the private uid (root mode, and mode none as root) or a
  nested user namespace (userns mode, so the code cannot undo the mounts), then no_new_privs and a seccomp
  filter that allows sockets of the UNIX / IPv4 / IPv6 families only.
"""
import ctypes
import json
import os
import platform
import resource
import select
import signal
import struct
import sys
import threading
import time
import traceback

libc = ctypes.CDLL(None, use_errno=True)

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 4, 8, 32, 4096, 16384
MS_NOATIME, MS_NODIRATIME, MS_PRIVATE, MS_RELATIME = 1024, 2048, 1 << 18, 1 << 21
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 4, 36, 38
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "ppc64le": 203, "s390x": 217, "riscv64": 41}
FRAME_MAX = 1 << 16  # bytes of one worker -> supervisor message; more is a broken channel
# Bound now: a snippet that replaces os.write / os.read / os.kill / struct.pack then garbles nothing of ours
# (it could still reach these through this module's globals, and would only break its own report).
_write, _read, _kill, _getpid, _pack, _unpack = os.write, os.read, os.kill, os.getpid, struct.pack, struct.unpack


class SetupError(Exception):
    """The sandbox could not be set up (reported as status 'sandbox_error', never the code's fault)."""


def fail_setup(cfg, msg):
    os.write(2, ("%s: %s\n" % (cfg["setup_msg"], msg)).encode())
    os._exit(cfg["exit_setup"])


def c_call(name, *args):
    if getattr(libc, name)(*args) != 0:
        e = ctypes.get_errno()
        raise SetupError("%s%r: %s" % (name, args, os.strerror(e)))


def mount(src, target, fstype, flags, data):
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    c_call("mount", enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data))


def write_frame(fd, payload):
    """One length-prefixed message; returns False if the pipe is gone."""
    data = _pack("<I", len(payload)) + payload
    try:
        while data:
            data = data[_write(fd, data):]
    except OSError:
        return False
    return True


def read_exact(fd, n):
    """n bytes, or None at EOF / on a closed descriptor."""
    buf = b""
    while len(buf) < n:
        try:
            chunk = _read(fd, n - len(buf))
        except InterruptedError:
            continue
        except OSError:
            return None
        if not chunk:
            return None
        buf += chunk
    return buf


def read_frame(fd, limit=None):
    head = read_exact(fd, 4)
    if head is None:
        return None
    (n,) = _unpack("<I", head)
    if limit is not None and n > limit:
        return None
    return read_exact(fd, n)


def enter_namespaces(cfg):
    """unshare(2) the namespaces; in userns mode map our uid/gid to themselves inside."""
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    if cfg["mode"] == "userns":
        flags |= CLONE_NEWUSER
    c_call("unshare", flags)
    if cfg["mode"] == "userns":
        for name, text in (("setgroups", "deny"), ("uid_map", "%d %d 1" % (uid, uid)),
                           ("gid_map", "%d %d 1" % (gid, gid))):
            with open("/proc/self/" + name, "w") as f:
                f.write(text)
    return uid, gid


def _locked_flags(path):
    """Mount flags a bind of `path` must keep (a user namespace may add but not clear them)."""
    f = os.statvfs(path).f_flag
    out = 0
    for st, ms in ((1, MS_RDONLY), (2, MS_NOSUID), (4, MS_NODEV), (8, MS_NOEXEC), (1024, MS_NOATIME),
                   (2048, MS_NODIRATIME), (4096, MS_RELATIME)):
        if f & st:
            out |= ms
    return out


def _bind(src, dst, readonly):
    mount(src, dst, None, MS_BIND, None)  # not MS_REC: mounts below src stay hidden
    if readonly:
        mount(None, dst, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | _locked_flags(src), None)


def build_root(cfg, owner):
    """Mounts the minimal root described by cfg['fs'] at cfg['newroot'] and pivots into it."""
    mount(None, "/", None, MS_REC | MS_PRIVATE, None)
    root = cfg["newroot"]
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=8m,mode=0755")
    # Private /tmp and /dev/shm first: an interpreter installed under /tmp (a venv in a checkout under /tmp, as CI
    # may have it) is then bound on top of the private tmpfs instead of being hidden by it.
    tmp_opts = "size=%d,nr_inodes=%d,mode=1777" % (cfg["tmpfs_bytes"], cfg["tmpfs_inodes"])
    for d in ("/tmp", "/dev/shm"):
        os.makedirs(root + d, exist_ok=True)
        mount("tmpfs", root + d, "tmpfs", MS_NOSUID | MS_NODEV, tmp_opts)
    for kind, src, dst in cfg["fs"]:
        target = root + dst
        if kind == "symlink":
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if not os.path.lexists(target):
                os.symlink(src, target)
            continue
        if os.path.lexists(target) and not os.path.isdir(target) and kind == "dir":
            continue  # already provided by a symlink
        if kind == "dir":
            os.makedirs(target, exist_ok=True)
        else:  # "file" (read-only) or "dev" (a device node, left writable)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if not os.path.exists(target):
                os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o644))
        _bind(src, target, readonly=kind != "dev")
    # The code's working directory (its HOME and TMPDIR too): private, owned by the code's uid.
    os.chown(root + "/tmp", owner[0], owner[1])
    os.makedirs(root + "/proc", exist_ok=True)
    mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
    os.chdir(root)
    nr = _SYS_PIVOT_ROOT.get(platform.machine())
    if nr is None:
        raise SetupError("pivot_root: unknown syscall number on %s" % platform.machine())
    if libc.syscall(nr, b".", b".") != 0:
        raise SetupError("pivot_root: %s" % os.strerror(ctypes.get_errno()))
    c_call("umount2", b".", MNT_DETACH)  # the old root, stacked on top by pivot_root(".", ".")
    os.chdir("/")
    mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, None)
    limit_ipc(cfg)


def limit_ipc(cfg):
    """SysV shared memory of the sandbox's own IPC namespace: at most shm_bytes in all, 64 segments. Best effort
    (a user namespace may not own these sysctls): where a memory cgroup exists it bounds shm pages anyway, and
    where none does the seccomp filter refuses shmget."""
    page = os.sysconf("SC_PAGE_SIZE")
    for name, value in (("shmmax", cfg["shm_bytes"]), ("shmall", max(1, cfg["shm_bytes"] // page)),
                        ("shmmni", 64)):
        try:
            with open("/proc/sys/kernel/" + name, "w") as f:
                f.write(str(value))
        except OSError:
            pass


# Seccomp (classic BPF): sockets only of the families the network namespace confines (UNIX, IPv4, IPv6). Others
# are not namespaced the same way (AF_VSOCK reaches the virtual machine's host, netlink families can read
# host events) and Python's code has no use for them. io_uring is refused (it can open sockets past this
# filter), and so is every syscall of a foreign ABI (i386 / x32 on x86_64, where numbers differ).
_SECCOMP_ARCH = {"x86_64": (0xC000003E, 41), "aarch64": (0xC00000B7, 198)}  # AUDIT_ARCH, __NR_socket
# Kernel interfaces no snippet needs and that widen the attack surface: keyrings (add_key, request_key,
# keyctl), bpf, perf_event_open, userfaultfd. Refused with EPERM.
_DENIED = {"x86_64": (248, 249, 250, 321, 298, 323), "aarch64": (217, 218, 219, 280, 241, 282)}
# Without a memory cgroup nothing bounds what memfds and SysV segments hold after their processes exit (RLIMIT_AS
# does not count them): memfd_create and shmget are then refused too (EPERM). /dev/shm, a bounded tmpfs, stays.
_SHARED_MEMORY = {"x86_64": (319, 29), "aarch64": (279, 194)}
_NR_IO_URING_SETUP = 425
_RET_ALLOW, _RET_ERRNO = 0x7FFF0000, 0x00050000
_LD_ABS, _JEQ, _JGE, _RET = 0x20, 0x15, 0x35, 0x06


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def install_seccomp(deny_shared_memory=False):
    """Applies the filter to this process and all it starts; False where the architecture is not known."""
    if platform.machine() not in _SECCOMP_ARCH:
        return False
    arch, nr_socket = _SECCOMP_ARCH[platform.machine()]
    denied = _DENIED[platform.machine()] + (_SHARED_MEMORY[platform.machine()] if deny_shared_memory else ())
    prog = [
        (_LD_ABS, 0, 0, 4),  # seccomp_data.arch
        (_JEQ, 1, 0, arch),
        (_RET, 0, 0, _RET_ERRNO | 1),  # EPERM: foreign ABI
        (_LD_ABS, 0, 0, 0),  # seccomp_data.nr
        (_JGE, 0, 1, 0x40000000),  # x32 ABI bit
        (_RET, 0, 0, _RET_ERRNO | 38),  # ENOSYS
        (_JEQ, 0, 1, _NR_IO_URING_SETUP),
        (_RET, 0, 0, _RET_ERRNO | 38),
        *[ins for nr in denied for ins in ((_JEQ, 0, 1, nr), (_RET, 0, 0, _RET_ERRNO | 1))],
        (_JEQ, 1, 0, nr_socket),
        (_RET, 0, 0, _RET_ALLOW),
        (_LD_ABS, 0, 0, 16),  # seccomp_data.args[0], low 32 bits: the address family
        (_JEQ, 3, 0, 1),  # AF_UNIX
        (_JEQ, 2, 0, 2),  # AF_INET
        (_JEQ, 1, 0, 10),  # AF_INET6
        (_RET, 0, 0, _RET_ERRNO | 97),  # EAFNOSUPPORT
        (_RET, 0, 0, _RET_ALLOW),
    ]
    filters = (_SockFilter * len(prog))(*[_SockFilter(*ins) for ins in prog])
    fprog = _SockFprog(len(prog), filters)
    c_call("prctl", 22, 2, ctypes.byref(fprog), 0, 0)  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
    return True


def drop_privileges(cfg):
    """In the worker, before any code runs: limits, then the uid (or nested userns), then no_new_privs."""
    mode = cfg["mode"]
    if mode == "userns":
        # A nested user namespace owns neither the mounts nor the network: the code cannot undo them.
        c_call("unshare", CLONE_NEWUSER)
    os.chdir(cfg["workdir"])
    try:  # under memory pressure the kernel's OOM killer takes the code's processes first, not the supervisor
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass
    for name, value in cfg["limits"].items():
        soft, hard = value if isinstance(value, list) else (value, value)
        resource.setrlimit(getattr(resource, name), (soft, hard))
    if cfg["uid"] >= 0:  # root mode, or mode none with an engine running as root
        os.setgroups([])
        os.setresgid(cfg["gid"], cfg["gid"], cfg["gid"])
        os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])
    c_call("prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    install_seccomp(cfg["deny_shared_memory"])
    if mode == "none":
        def _no_network(event, args):
            if event.startswith("socket.") and event != "socket.gethostname":
                raise PermissionError("network access is disabled in the prmkern sandbox")
        sys.addaudithook(_no_network)
