"""MuJoCo simulator back ends that step many copies of one model together (``mujoco_batch`` uses them).

- ``_BatchSim``: MuJoCo >= 4's ``mujoco.batch.Batch``: the copies' states are the rows of one
  array, stepped on MuJoCo's C thread pool (bit-identical to ``mj_step`` on one ``MjData`` per
  copy). It cannot give the ant's ``cfrc_ext``: that needs ``mj_rnePostConstraint`` after
  ``mj_step`` on the copy's own data, which the Python batch does not run, and the ant's RK4
  integrator leaves the data at its last internal stage, so a sensor computing it during the
  step would not give gymnasium's value either.
- ``_CapiSim``: the same batch, persistent (one ``mjData`` per copy), driven through MuJoCo's C
  API with ctypes so that ``mjb_apply`` can run ``mj_rnePostConstraint`` on every copy after
  ``mjb_step``, on the C thread pool.
- ``_ThreadSim``: one ``MjData`` per copy, stepped by ``mj_step`` (and ``mj_rnePostConstraint``)
  from Python threads (MuJoCo releases the GIL) that take chunks of copies in turn: a Python
  call per copy, the only back end with MuJoCo 3.

Each has ``reset(ids, qpos, qvel)``, ``step(ids, ctrl)`` and the arrays ``qpos``, ``qvel`` (and
``xpos``, ``cfrc_ext`` where the ant needs them) with one row per copy. Their speeds:
BENCHMARKS.md, "Batched MuJoCo sampler".

``paper=True`` (``_CapiSim`` and ``_ThreadSim``; ``env.variant: paper``) steps as rllab's
``forward_dynamics`` did: ``mj_step``, then ``mj_forward`` at the new state (MuJoCo 1.31's
forward also computed the contact forces: ``mj_rnePostConstraint`` where ``cfrc_ext`` is needed)
and ``mj_subtreeVel``, and gives ``xmat``, ``subtree_com`` and ``subtree_linvel`` too, all at the
new state. A reset ends with the same ``mj_forward`` (and ``mj_rnePostConstraint``).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import mujoco
import numpy as np


def load_model(path: str) -> mujoco.MjModel:
    """The compiled model of an MJCF file, with the file's ``settotalmass`` applied after compiling.

    MuJoCo 4 deprecates the compiler attribute (gymnasium's half_cheetah.xml sets it to 14) and
    prints a warning each time a model using it compiles; ``mj_setTotalmass`` + ``mj_setConst`` on the
    compiled model is its supported replacement and gives the same model, bit for bit.
    """
    if not hasattr(mujoco, "MjSpec"):  # MuJoCo < 3.2: no specs, and the attribute is not deprecated yet
        return mujoco.MjModel.from_xml_path(path)
    spec = mujoco.MjSpec.from_file(path)
    total = spec.compiler.settotalmass
    spec.compiler.settotalmass = -1  # MuJoCo's "unset"
    model = spec.compile()
    if total > 0:
        mujoco.mj_setTotalmass(model, total)
        mujoco.mj_setConst(model, mujoco.MjData(model))
    return model


def initial_qpos(model: mujoco.MjModel) -> np.ndarray:
    """The state a reset starts from, as rllab's ``MujocoEnv`` took it: the model's custom numeric
    ``init_qpos`` when the file has one, else ``qpos0`` (rllab's ant.xml has one; gymnasium's
    Ant-v5 ignores the same numeric in its file and starts from ``qpos0``)."""
    i = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_NUMERIC, "init_qpos")
    if i < 0:
        return model.qpos0.copy()
    adr, size = int(model.numeric_adr[i]), int(model.numeric_size[i])
    if size != model.nq:
        raise ValueError(f"the model's init_qpos has {size} numbers, its qpos {model.nq}")
    return model.numeric_data[adr : adr + size].astype(np.float64)


def has_batch() -> bool:
    """Whether this MuJoCo has ``mujoco.batch`` (MuJoCo >= 4)."""
    try:
        import mujoco.batch  # noqa: F401
    except ImportError:
        return False
    return True


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


class _BatchSim:
    """All copies as the state rows of a ``mujoco.batch.Batch`` (MuJoCo >= 4)."""

    def __init__(self, model: mujoco.MjModel, n: int, threads: int, frame_skip: int, need_xpos: bool):
        from mujoco.batch import Batch

        self.batch = Batch(model, n, threads)
        self.frame_skip = frame_skip
        self.qpos, self.qvel, self.ctrl = (self.batch.bind(k) for k in ("qpos", "qvel", "ctrl"))
        self.xpos = self.batch.bind("xpos") if need_xpos else None

    def reset(self, ids: np.ndarray, qpos: np.ndarray, qvel: np.ndarray) -> None:
        """``mj_resetData`` then the given state, as gymnasium's ``reset`` (its ``mj_forward``
        computes nothing the next step or the half-cheetah's observation reads: ``mj_step``
        starts with its own)."""
        sel = _ids(ids, self.batch.nsim)
        self.batch.reset(sel, stage=mujoco.mjtStage.mjSTAGE_NONE)
        self.qpos[ids], self.qvel[ids] = qpos, qvel

    def step(self, ids: np.ndarray, ctrl: np.ndarray) -> None:
        self.ctrl[ids] = ctrl
        self.batch.step(_ids(ids, self.batch.nsim), nstep=self.frame_skip)


def _ids(ids: np.ndarray, n: int) -> np.ndarray | None:
    return None if len(ids) == n else ids.astype(np.int32)


_CAPI = None  # the mjb_* functions of libmujoco (MuJoCo >= 4) through ctypes, once loaded


def _capi():
    """libmujoco with the argument types of the batch functions ``_CapiSim`` calls, or None."""
    global _CAPI
    if _CAPI is not None:
        return _CAPI or None
    import ctypes
    import glob

    _CAPI = False
    here = os.path.dirname(mujoco.__file__)
    names = ("libmujoco.so*", "libmujoco*.dylib", "mujoco.dll")
    paths = [p for name in names for p in glob.glob(os.path.join(here, name))]
    try:
        lib = ctypes.CDLL(sorted(paths)[0])
        lib.mjb_makeBatch  # noqa: B018  (MuJoCo >= 4)
    except (IndexError, OSError, AttributeError):
        return None
    vp, i, ip = ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_int)

    class Config(ctypes.Structure):  # mjBatchConfig
        _fields_ = [("nthread", ctypes.c_int), ("persistent", ctypes.c_ubyte)]

    signatures = {
        "mjb_makeBatch": (vp, [vp, i, ctypes.POINTER(Config), ctypes.c_char_p, i]),
        "mjb_deleteBatch": (None, [vp]),
        "mjb_nstate": (i, [vp]),
        "mjb_state": (vp, [vp]),
        "mjb_stateComponent": (vp, [vp, i, ip]),
        "mjb_output": (vp, [vp, ctypes.c_char_p, ip, ip]),
        "mjb_step": (i, [vp, vp, i, i, i]),
        "mjb_forward": (i, [vp, vp, i, i]),
        "mjb_reset": (i, [vp, vp, i, vp, i]),
        "mjb_apply": (i, [vp, vp, i, vp, vp, i]),
        "mjb_error": (ctypes.c_char_p, [vp, i]),
        "mjb_status": (vp, [vp]),
    }
    for name, (res, args) in signatures.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    lib.Config = Config
    # called by mjb_apply as an mjfBatchFunc (m, d, sim, arg): the two extra arguments are
    # ignored under the C calling conventions (the caller passes and removes them)
    lib.rne_post_constraint = ctypes.cast(lib.mj_rnePostConstraint, vp)
    lib.subtree_vel = ctypes.cast(lib.mj_subtreeVel, vp)  # the same, for the paper variant's velocity
    _CAPI = lib
    return lib


def has_capi() -> bool:
    """Whether libmujoco's batch C API (MuJoCo >= 4) can be called through ctypes."""
    return _capi() is not None


class _CapiSim:
    """All copies in a persistent ``mjBatch`` (one ``mjData`` each) driven through MuJoCo's C API:
    ``mjb_step`` then ``mjb_apply(mj_rnePostConstraint)`` on the C thread pool, as gymnasium's
    ``mj_step`` + ``mj_rnePostConstraint`` on each copy's own data; ``mjb_forward`` at stage
    ``mjSTAGE_NONE`` (nothing recomputed) then copies the outputs (``mjb_apply`` does not).
    ``mujoco.batch.Batch`` wraps the same batch but not ``mjb_apply``.

    ``paper``: ``mjb_step`` computes ``mj_forward`` at the new state, then ``mjb_apply`` runs
    ``mj_rnePostConstraint`` (``need_cfrc``) and ``mj_subtreeVel`` (see the module's docstring)."""

    def __init__(
        self,
        model: mujoco.MjModel,
        n: int,
        threads: int,
        frame_skip: int,
        paper: bool = False,
        need_cfrc: bool = True,
    ):
        import ctypes

        lib = _capi()
        if lib is None:
            raise RuntimeError("MuJoCo's batch C API (MuJoCo >= 4) is not available")
        self.lib, self.n, self.frame_skip = lib, n, frame_skip
        self.paper, self.need_cfrc = paper, need_cfrc or not paper
        err = ctypes.create_string_buffer(1000)
        self.ptr = lib.mjb_makeBatch(model._address, n, ctypes.byref(lib.Config(threads, 1)), err, len(err))
        if not self.ptr:
            raise RuntimeError(f"mjb_makeBatch: {err.value.decode()}")
        import weakref

        self._finalizer = weakref.finalize(self, lib.mjb_deleteBatch, self.ptr)
        base = lib.mjb_state(self.ptr)
        rows = _as_array(base, (n, lib.mjb_nstate(self.ptr)))

        def component(bit) -> np.ndarray:
            size = ctypes.c_int()
            addr = lib.mjb_stateComponent(self.ptr, int(bit), ctypes.byref(size))
            offset = (addr - base) // rows.itemsize
            return rows[:, offset : offset + size.value]

        def output(name: str, shape: tuple) -> np.ndarray:
            size, elem = ctypes.c_int(), ctypes.c_int()
            addr = lib.mjb_output(self.ptr, name.encode(), ctypes.byref(size), ctypes.byref(elem))
            if not addr or elem.value != 8:
                raise RuntimeError(f"mjb_output({name!r}) failed")
            return _as_array(addr, (n, size.value)).reshape(n, *shape)

        S = mujoco.mjtState
        self.qpos, self.qvel, self.ctrl = (component(c) for c in (S.mjSTATE_QPOS, S.mjSTATE_QVEL, S.mjSTATE_CTRL))
        self.xpos = output("xpos", (model.nbody, 3))
        self.cfrc_ext = output("cfrc_ext", (model.nbody, 6)) if self.need_cfrc else None
        if paper:
            self.xmat = output("xmat", (model.nbody, 9))
            self.subtree_com = output("subtree_com", (model.nbody, 3))
            self.subtree_linvel = output("subtree_linvel", (model.nbody, 3))

    def _call(self, name: str, ids: np.ndarray, *args) -> None:
        sel = None if len(ids) == self.n else np.ascontiguousarray(ids, dtype=np.int32)
        ptr = None if sel is None else sel.ctypes.data
        failed = getattr(self.lib, name)(self.ptr, ptr, 0 if sel is None else len(sel), *args)
        if failed:
            errors = {i: self.lib.mjb_error(self.ptr, i) for i in ids.tolist()}
            first = next(((i, e.decode()) for i, e in errors.items() if e), None)
            where = f"; simulation {first[0]}: {first[1]}" if first else ""
            raise RuntimeError(f"{name}: MuJoCo raised in {failed} simulations{where}")

    def reset(self, ids: np.ndarray, qpos: np.ndarray, qvel: np.ndarray) -> None:
        """``mj_resetData``, the state, ``mj_forward``: gymnasium's ``reset`` and ``set_state``."""
        self._call("mjb_reset", ids, None, int(mujoco.mjtStage.mjSTAGE_NONE))
        self.qpos[ids], self.qvel[ids] = qpos, qvel
        self._call("mjb_forward", ids, int(mujoco.mjtStage.mjSTAGE_ACC))
        if self.paper and self.need_cfrc:  # rllab's reset: 1.31's forward gave the contact forces
            self._call("mjb_apply", ids, self.lib.rne_post_constraint, None, 0)
            self._call("mjb_forward", ids, int(mujoco.mjtStage.mjSTAGE_NONE))

    def step(self, ids: np.ndarray, ctrl: np.ndarray) -> None:
        self.ctrl[ids] = ctrl
        if self.paper:
            self._call("mjb_step", ids, self.frame_skip, int(mujoco.mjtStage.mjSTAGE_ACC))
            if self.need_cfrc:
                self._call("mjb_apply", ids, self.lib.rne_post_constraint, None, 0)
            self._call("mjb_apply", ids, self.lib.subtree_vel, None, 0)
            self._call("mjb_forward", ids, int(mujoco.mjtStage.mjSTAGE_NONE))
            return
        self._call("mjb_step", ids, self.frame_skip, int(mujoco.mjtStage.mjSTAGE_NONE))
        self._call("mjb_apply", ids, self.lib.rne_post_constraint, None, 0)
        self._call("mjb_forward", ids, int(mujoco.mjtStage.mjSTAGE_NONE))  # copies the outputs out

    def close(self) -> None:
        self._finalizer()


def _as_array(addr: int, shape: tuple) -> np.ndarray:
    import ctypes

    return np.ctypeslib.as_array(ctypes.cast(addr, ctypes.POINTER(ctypes.c_double)), shape)


class _ThreadSim:
    """One ``MjData`` per copy, stepped from ``threads`` Python threads (MuJoCo releases the GIL)."""

    def __init__(
        self, model: mujoco.MjModel, n: int, threads: int, frame_skip: int, need_cfrc: bool, paper: bool = False
    ):
        self.model, self.frame_skip, self.need_cfrc, self.paper = model, frame_skip, need_cfrc, paper
        self.datas = [mujoco.MjData(model) for _ in range(n)]
        self.qpos = np.zeros((n, model.nq))
        self.qvel = np.zeros((n, model.nv))
        self.xpos = np.zeros((n, model.nbody, 3))
        self.cfrc_ext = np.zeros((n, model.nbody, 6))
        # each copy's MjData arrays, fetched once (an attribute access builds a new view)
        self.views = [(d.ctrl, d.qpos, d.qvel, d.xpos, d.cfrc_ext) for d in self.datas]
        if paper:  # the state after mj_forward, and the paper variant's observation and velocity
            self.xmat = np.zeros((n, model.nbody, 9))
            self.subtree_com = np.zeros((n, model.nbody, 3))
            self.subtree_linvel = np.zeros((n, model.nbody, 3))
            self.paper_views = [(d.xmat, d.subtree_com, d.subtree_linvel) for d in self.datas]
        self.threads = max(1, threads)
        self.pool = ThreadPoolExecutor(self.threads - 1) if self.threads > 1 else None

    def _gather(self, i: int) -> None:
        _, qpos, qvel, xpos, cfrc = self.views[i]
        self.qpos[i], self.qvel[i], self.xpos[i] = qpos, qvel, xpos
        if self.need_cfrc:
            self.cfrc_ext[i] = cfrc
        if self.paper:
            self.xmat[i], self.subtree_com[i], self.subtree_linvel[i] = self.paper_views[i]

    def reset(self, ids: np.ndarray, qpos: np.ndarray, qvel: np.ndarray) -> None:
        m = self.model
        for j, i in enumerate(ids.tolist()):  # gymnasium's reset and set_state
            d = self.datas[i]
            mujoco.mj_resetData(m, d)
            d.qpos[:], d.qvel[:] = qpos[j], qvel[j]
            mujoco.mj_forward(m, d)
            if self.paper and self.need_cfrc:
                mujoco.mj_rnePostConstraint(m, d)
            self._gather(i)

    def _run_paper(self, ids: list[int], ctrl: np.ndarray) -> None:
        """rllab's step: ``mj_step``, ``mj_forward`` (and the contact forces) at the new state,
        the subtree velocities."""
        m, nstep, datas, views = self.model, self.frame_skip, self.datas, self.views
        step, forward, post = mujoco.mj_step, mujoco.mj_forward, mujoco.mj_rnePostConstraint
        for i, u in zip(ids, ctrl):
            views[i][0][:] = u
            d = datas[i]
            step(m, d, nstep)
            forward(m, d)
            if self.need_cfrc:
                post(m, d)
            mujoco.mj_subtreeVel(m, d)
            self._gather(i)

    def _run(self, ids: list[int], ctrl: np.ndarray) -> None:
        if self.paper:
            return self._run_paper(ids, ctrl)
        m, nstep, step, post = self.model, self.frame_skip, mujoco.mj_step, mujoco.mj_rnePostConstraint
        views, qpos_out, qvel_out, xpos_out, cfrc_out = self.views, self.qpos, self.qvel, self.xpos, self.cfrc_ext
        datas = self.datas
        if not self.need_cfrc:  # the half-cheetah: its state only
            for i, u in zip(ids, ctrl):
                c, qpos, qvel, _, _ = views[i]
                c[:] = u
                step(m, datas[i], nstep)
                qpos_out[i], qvel_out[i] = qpos, qvel
            return
        for i, u in zip(ids, ctrl):
            c, qpos, qvel, xpos, cfrc = views[i]
            c[:] = u
            d = datas[i]
            step(m, d, nstep)
            post(m, d)  # gymnasium's MujocoEnv calls it after every step
            qpos_out[i], qvel_out[i], xpos_out[i], cfrc_out[i] = qpos, qvel, xpos, cfrc

    def step(self, ids: np.ndarray, ctrl: np.ndarray) -> None:
        """Step the copies ``ids``; with several threads, each takes the next chunk of copies
        until none is left (static halves wait for the slower thread on a shared machine)."""
        idx = ids.tolist()
        if self.pool is None or len(idx) < 2 * self.threads:
            self._run(idx, ctrl)
            return
        size = max(1, len(idx) // (8 * self.threads))
        chunks = iter(range(0, len(idx), size))  # next() on it is atomic under the GIL

        def work() -> None:
            for a in chunks:
                self._run(idx[a : a + size], ctrl[a : a + size])

        futures = [self.pool.submit(work) for _ in range(self.threads - 1)]
        work()
        for f in futures:
            f.result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
