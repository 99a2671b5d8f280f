"""
    PyBridge

The Julia side of pybridge's `engine="julia"`: solves ODEs whose right-hand side is a PyTorch
module, called back through PythonCall with raw pointers so that torch views Julia's memory
without copies. The Python side is `pybridge/julia_engine/`.

Every callback receives `(address, length)` pairs of contiguous Julia arrays plus the address of a
one-element time buffer; the Python side keeps torch views keyed by `(address, length)`.
Arrays are column-major: a torch batch `(B, n)` is an `n × B` matrix here.
"""
module PyBridge

using LinearAlgebra
using SparseArrays
using PythonCall: Py
using SciMLBase
using ADTypes: AutoFiniteDiff
using DiffEqCallbacks: FunctionCallingCallback
using SciMLSensitivity: adjoint_sensitivities, GaussAdjoint, InterpolatingAdjoint,
                        QuadratureAdjoint, BacksolveAdjoint, EnzymeVJP
import OrdinaryDiffEq
import OrdinaryDiffEqCore
import OrdinaryDiffEqLowOrderRK
import OrdinaryDiffEqRosenbrock
import OrdinaryDiffEqSDIRK

const Floats = Union{Float32, Float64}

# ---------------------------------------------------------------------------------------------
# Callbacks into Python. One concrete callable type per role, so that ODEFunction{true} never has
# to guess in-place-ness from a Python object and every call compiles once.

"A Python callable `fn(out_addr, out_len, in_addr, in_len, t_addr)` writing into `out`."
struct PyCallback{T <: Floats}
    fn::Py
    tbuf::Vector{T}   # the time, passed by address like the arrays (no Python float per call)
end
PyCallback{T}(fn::Py) where {T} = PyCallback{T}(fn, zeros(T, 1))

addr(x::Array) = UInt(pointer(x))

function nodual(x)
    throw(ArgumentError("the Python right-hand side was called with $(typeof(x)): Julia's " *
                        "automatic differentiation cannot see through Python. pybridge passes " *
                        "jac/tgrad/vjp from torch and autodiff=AutoFiniteDiff(); a method that " *
                        "still differentiates f itself is not supported on engine=\"julia\""))
end

# Contiguous arrays of the callback's element type go across as they are; anything else (views
# made by the adjoint, other eltypes) goes through a temporary copy.
dense(::Type{T}, x::Array{T}) where {T} = x
dense(::Type{T}, x::AbstractArray{<:AbstractFloat}) where {T} = Array{T}(x)
dense(::Type{T}, x) where {T} = nodual(x)

function call!(cb::PyCallback{T}, out::AbstractArray, t, ins::AbstractArray...) where {T}
    t isa AbstractFloat || nodual(t)
    o = dense(T, out)
    xs = map(x -> dense(T, x), ins)
    cb.tbuf[1] = t
    GC.@preserve o xs cb pyinvoke(cb, o, xs...)
    o === out || copyto!(out, o)
    return nothing
end

# Fixed arities keep the call free of dynamic dispatch (the target is a few µs per call).
pyinvoke(cb::PyCallback, o, x) = cb.fn(addr(o), length(o), addr(x), length(x), addr(cb.tbuf))
pyinvoke(cb::PyCallback, o, x, y) =
    cb.fn(addr(o), length(o), addr(x), length(x), addr(y), length(y), addr(cb.tbuf))

"In-place right-hand side f(du, u, p, t)."
struct RHS{T}
    cb::PyCallback{T}
end
(f::RHS)(du, u, p, t) = call!(f.cb, du, t, u)

"Jacobian J(J, u, p, t); a sparse block-diagonal J (lockstep batches) is filled through its nonzeros."
struct Jac{T}
    cb::PyCallback{T}
end
(j::Jac)(J::SparseMatrixCSC, u, p, t) = call!(j.cb, nonzeros(J), t, u)
(j::Jac)(J::AbstractMatrix, u, p, t) = call!(j.cb, J, t, u)

"Time derivative ∂f/∂t, tgrad(dT, u, p, t)."
struct TGrad{T}
    cb::PyCallback{T}
end
(g::TGrad)(dT, u, p, t) = call!(g.cb, dT, t, u)

"(∂f/∂u)ᵀλ as vjp(dλ, λ, u, p, t), and (∂f/∂θ)ᵀv as vjp_p(Jpv, v, u, p, t)."
struct VJP{T}
    cb::PyCallback{T}
end
(v::VJP)(out, λ, u, p, t) = call!(v.cb, out, t, λ, u)

# ---------------------------------------------------------------------------------------------
# Methods. Names match pybridge's solver classes one to one.

const EXPLICIT = Dict{String, Any}(
    "Euler" => OrdinaryDiffEqLowOrderRK.Euler, "Midpoint" => OrdinaryDiffEqLowOrderRK.Midpoint,
    "Heun" => OrdinaryDiffEqLowOrderRK.Heun, "RK4" => OrdinaryDiffEqLowOrderRK.RK4,
    "BS3" => OrdinaryDiffEqLowOrderRK.BS3, "DP5" => OrdinaryDiffEqLowOrderRK.DP5,
    "Tsit5" => OrdinaryDiffEq.Tsit5, "Vern7" => OrdinaryDiffEq.Vern7)

# Implicit methods get finite differences as their AD backend: with `jac` and `tgrad` supplied
# they never need it, and if some path does, finite differences call f with plain Floats.
const IMPLICIT = Dict{String, Any}(
    "Rosenbrock23" => OrdinaryDiffEqRosenbrock.Rosenbrock23,
    "Rodas4" => OrdinaryDiffEqRosenbrock.Rodas4, "Rodas5P" => OrdinaryDiffEqRosenbrock.Rodas5P,
    "Kvaerno5" => OrdinaryDiffEqSDIRK.Kvaerno5, "KenCarp4" => OrdinaryDiffEqSDIRK.KenCarp4,
    "TRBDF2" => OrdinaryDiffEqSDIRK.TRBDF2)

const COMPOSITE = Dict{String, Any}(
    "AutoTsit5" => OrdinaryDiffEq.AutoTsit5, "AutoVern7" => OrdinaryDiffEq.AutoVern7)

function make_alg(name::AbstractString, stiff::AbstractString = "")
    haskey(EXPLICIT, name) && return EXPLICIT[name]()
    haskey(IMPLICIT, name) && return IMPLICIT[name](autodiff = AutoFiniteDiff())
    haskey(COMPOSITE, name) && return COMPOSITE[name](make_alg(stiff))
    throw(ArgumentError("PyBridge: unknown method $name"))
end

function make_sensealg(name::AbstractString)
    # User vjp/vjp_p on the ODEFunction take priority over `autojacvec` (SciMLSensitivity.jl PR #1374,
    # merged 2026-02-27; 7.116.2 is the first release we know to contain it, hence the compat floor);
    # autojacvec is set explicitly because the default silently falls back to numerical VJPs.
    name == "GaussAdjoint" && return GaussAdjoint(autojacvec = EnzymeVJP(), checkpointing = true)
    name == "InterpolatingAdjoint" &&
        return InterpolatingAdjoint(autojacvec = EnzymeVJP(), checkpointing = true)
    name == "BacksolveAdjoint" &&
        return BacksolveAdjoint(autojacvec = EnzymeVJP(), checkpointing = true)
    name == "QuadratureAdjoint" && return QuadratureAdjoint(autojacvec = EnzymeVJP())
    throw(ArgumentError("PyBridge: unknown sensitivity algorithm $name"))
end

# ---------------------------------------------------------------------------------------------
# Per-step trace: t, dt, the controller's error estimate and the stiffness estimate.

struct StepTrace{T}
    t::Vector{T}
    dt::Vector{T}
    eest::Vector{T}
    stiffness::Vector{T}
end
StepTrace{T}() where {T} = StepTrace{T}(T[], T[], T[], T[])

# OrdinaryDiffEq v7 moved EEst into the controller cache; v6 has the integrator field.
const HAS_GET_EEST = isdefined(OrdinaryDiffEqCore, :get_EEst)
error_estimate(integ) = HAS_GET_EEST ? OrdinaryDiffEqCore.get_EEst(integ) : integ.EEst

# eigen_est is only maintained by composite (auto-switching) algorithms.
has_stiffness(integ) = hasproperty(integ.alg, :choice_function) && hasproperty(integ, :eigen_est)

function (tr::StepTrace{T})(u, t, integ) where {T}
    push!(tr.t, t)
    push!(tr.dt, abs(t - integ.tprev))
    push!(tr.eest, integ.opts.adaptive ? T(error_estimate(integ)) : T(NaN))
    push!(tr.stiffness, has_stiffness(integ) ? T(integ.eigen_est) : T(NaN))
    return nothing
end

# ---------------------------------------------------------------------------------------------
# Solve

wrap(::Type{T}, address::Integer, dims...) where {T} =
    unsafe_wrap(Array, Ptr{T}(UInt(address)), dims)

"A block-diagonal sparsity pattern: `nblocks` dense n×n blocks (samples are independent)."
function blockdiag_prototype(::Type{T}, n::Int, nblocks::Int) where {T}
    P = blockdiag(fill(sparse(ones(T, n, n)), nblocks)...)
    fill!(nonzeros(P), zero(T))
    return P
end

"A scalar tolerance, or (address ≠ 0) a per-component one laid out like the state."
tolerance(::Type{T}, x::Real, address::Integer, dims) where {T} =
    address == 0 ? T(x) : copy(wrap(T, address, dims...))

"""
    solve_ode(bridge, dtype, u0_addr, n, m, ts_addr, nt, p_addr, np, alg, stiff; options...)

Solve du/dt = f(u, t) for the n × m state at `u0_addr`, saving at the `nt` times at `ts_addr`.
`bridge` is the Python object with the callbacks `rhs`, `jac`, `tgrad`, `vjp_u`, `vjp_p`.
Returns a NamedTuple of plain arrays (see `result`) plus the solution for dense output/adjoints.
"""
function solve_ode(bridge::Py, dtype::AbstractString, u0_addr::Integer, n::Integer, m::Integer,
                   ts_addr::Integer, nt::Integer, p_addr::Integer, np::Integer,
                   alg::AbstractString, stiff::AbstractString; kwargs...)
    T = dtype == "Float32" ? Float32 : Float64
    u0 = copy(wrap(T, u0_addr, n, m))
    ts = copy(wrap(T, ts_addr, nt))
    p = copy(wrap(T, p_addr, np))
    return _solve(T, bridge, u0, ts, p, make_alg(alg, stiff); kwargs...)
end

function _solve(::Type{T}, bridge::Py, u0::Matrix{T}, ts::Vector{T}, p::Vector{T}, alg;
                reltol::Real, abstol::Real, reltol_addr::Integer = 0, abstol_addr::Integer = 0,
                dt::Real, adaptive::Bool, dtmin::Real, dtmax::Real,
                maxiters::Integer, dense::Bool, implicit::Bool) where {T}
    n, m = size(u0)
    rhs = RHS{T}(PyCallback{T}(bridge.rhs))
    fkw = (vjp = VJP{T}(PyCallback{T}(bridge.vjp_u)), vjp_p = VJP{T}(PyCallback{T}(bridge.vjp_p)))
    if implicit
        proto = m > 1 ? blockdiag_prototype(T, n, m) : nothing
        fkw = (; fkw..., jac = Jac{T}(PyCallback{T}(bridge.jac)),
               tgrad = TGrad{T}(PyCallback{T}(bridge.tgrad)), jac_prototype = proto)
    end
    # FullSpecialize: our callables are concrete types; no FunctionWrappers needed or wanted.
    f = ODEFunction{true, SciMLBase.FullSpecialize}(rhs; fkw...)
    prob = ODEProblem{true}(f, u0, (ts[1], ts[end]), p)
    trace = StepTrace{T}()
    cb = FunctionCallingCallback(trace; func_everystep = true, func_start = false,
                                 tdir = ts[end] >= ts[1] ? 1 : -1)
    # Dense output keeps every step (sol(t) later, and the adjoint's forward interpolation);
    # otherwise only the requested times are stored.
    save = dense ? (save_everystep = true, dense = true) :
                   (saveat = ts, save_everystep = false, dense = false)
    stepkw = dt > 0 ? (dt = T(dt),) : (;)
    sol = SciMLBase.solve(prob, alg; save..., stepkw..., callback = cb,
                          reltol = tolerance(T, reltol, reltol_addr, (n, m)),
                          abstol = tolerance(T, abstol, abstol_addr, (n, m)),
                          adaptive, dtmin = T(dtmin), dtmax = T(dtmax), maxiters)
    return result(T, sol, ts, trace, dense)
end

"Values at the requested times, NaN where the solve did not get (a failed sample keeps the rest)."
function values_at(::Type{T}, sol, ts::Vector{T}, dense::Bool) where {T}
    n, m = size(sol.prob.u0)
    Y = fill(T(NaN), n, m, length(ts))
    isempty(sol.t) && return Y
    forward = ts[end] >= ts[1]
    reached(t) = forward ? t <= sol.t[end] : t >= sol.t[end]
    k = 1
    for (j, tj) in enumerate(ts)
        reached(tj) || break
        if dense
            Y[:, :, j] .= sol(tj)
        else
            # saveat stores the requested times in order (plus, on failure, the last state)
            while k <= length(sol.t) && sol.t[k] != tj
                k += 1
            end
            k > length(sol.t) && break
            Y[:, :, j] .= sol.u[k]
        end
    end
    return Y
end

function result(::Type{T}, sol, ts, trace::StepTrace{T}, dense::Bool) where {T}
    s = sol.stats
    return (ys = values_at(T, sol, ts, dense), ts = ts,
            retcode = String(Symbol(sol.retcode)),
            nf = s.nf, naccept = s.naccept, nreject = s.nreject,
            njacs = s.njacs, nw = s.nw, nsolve = s.nsolve,
            trace_t = trace.t, trace_dt = trace.dt, trace_eest = trace.eest,
            trace_stiffness = trace.stiffness,
            t_final = T(sol.t[end]), dt_final = T(isempty(trace.dt) ? 0 : trace.dt[end]),
            sol = sol)
end

"Dense output: write sol(tq) for the `nq` times at `tq_addr` into the n × m × nq buffer at `out_addr`."
function interpolate!(res, tq_addr::Integer, nq::Integer, out_addr::Integer)
    sol = res.sol
    T = eltype(sol.prob.u0)
    n, m = size(sol.prob.u0)
    tq = wrap(T, tq_addr, nq)
    out = wrap(T, out_addr, n, m, nq)
    t0, t1 = sol.t[1], sol.t[end]
    lo, hi = min(t0, t1), max(t0, t1)
    for j in 1:nq
        if lo <= tq[j] <= hi
            out[:, :, j] .= sol(tq[j])
        else
            out[:, :, j] .= T(NaN)
        end
    end
    return nothing
end

"""
    adjoint(res, grad_addr, sensealg; reltol, abstol)

Gradients of `L` given `∂L/∂ys` (an n × m × nt buffer at `grad_addr`, the layout of `res.ys`):
returns `(du0, dp)` from `adjoint_sensitivities` with the torch VJPs on the ODEFunction.
"""
function adjoint(res, grad_addr::Integer, sensealg::AbstractString;
                 reltol::Real, abstol::Real, reltol_addr::Integer = 0, abstol_addr::Integer = 0)
    sol = res.sol
    T = eltype(sol.prob.u0)
    n, m = size(sol.prob.u0)
    G = wrap(T, grad_addr, n, m, length(res.ts))
    dg(out, u, p, t, i) = (vec(out) .= vec(view(G, :, :, i)); nothing)
    du0, dp = adjoint_sensitivities(sol, sol.alg; t = res.ts, dgdu_discrete = dg,
                                    sensealg = make_sensealg(sensealg),
                                    reltol = tolerance(T, reltol, reltol_addr, (n, m)),
                                    abstol = tolerance(T, abstol, abstol_addr, (n, m)))
    return (du0 = Array{T}(reshape(du0, n, m)), dp = Vector{T}(vec(dp)))
end

end # module
