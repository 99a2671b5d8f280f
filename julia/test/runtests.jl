# Julia-side tests of PyBridge, run where Julia exists:
#   julia --project=. julia/test/runtests.jl        (from the repository root)
# The callbacks are Julia functions wrapped as Python callables (PythonCall's `Py(f)`), so the
# whole path Julia → Python call → raw addresses → writes into Julia memory is exercised without
# torch; the torch side is tested by tests/test_julia_engine.py.
using Test
using PythonCall

isdefined(Main, :PyBridge) || include(joinpath(@__DIR__, "..", "src", "PyBridge.jl"))
using .PyBridge

view_of(addr, len) = unsafe_wrap(Array, Ptr{Float64}(UInt(addr)), len)

"A Python namespace with the callbacks of du/dt = -θ u (θ = p[1]), state n × m."
function decay_bridge(θ)
    rhs(du, ndu, u, nu, t) = (view_of(du, ndu) .= -θ .* view_of(u, nu); nothing)
    # The stiff tests use n = 1: every block of the (block-diagonal) Jacobian is the 1×1 [-θ].
    jac(J, nJ, u, nu, t) = (fill!(view_of(J, nJ), -θ); nothing)
    tgrad(dT, ndT, u, nu, t) = (fill!(view_of(dT, ndT), 0.0); nothing)
    vjp_u(o, no, λ, nλ, u, nu, t) = (view_of(o, no) .= -θ .* view_of(λ, nλ); nothing)
    vjp_p(o, no, v, nv, u, nu, t) = (view_of(o, no)[1] = -sum(view_of(v, nv) .* view_of(u, nu)); nothing)
    ns = pyimport("types").SimpleNamespace
    return ns(rhs = Py(rhs), jac = Py(jac), tgrad = Py(tgrad), vjp_u = Py(vjp_u), vjp_p = Py(vjp_p))
end

addr(x) = UInt(pointer(x))
opts(; kw...) = (reltol = 1e-8, abstol = 1e-10, dt = 0.0, adaptive = true, dtmin = 0.0,
                 dtmax = 1.0, maxiters = 100_000, dense = false, implicit = false, kw...)

function solve_decay(alg; θ = 0.7, u0 = [1.0 2.0; 3.0 4.0], ts = collect(0.0:0.25:1.0), stiff = "", kw...)
    b = decay_bridge(θ)
    p = [θ]
    GC.@preserve u0 ts p begin
        PyBridge.solve_ode(b, "Float64", addr(u0), size(u0, 1), size(u0, 2), addr(ts), length(ts),
                           addr(p), 1, alg, stiff; opts(; kw...)...)
    end
end

@testset "PyBridge" begin
    @testset "every method name builds" begin
        for name in ("Euler", "Midpoint", "Heun", "RK4", "BS3", "DP5", "Tsit5", "Vern7",
                     "Rosenbrock23", "Rodas4", "Rodas5P", "Kvaerno5", "KenCarp4", "TRBDF2")
            @test PyBridge.make_alg(name) !== nothing
        end
        @test PyBridge.make_alg("AutoTsit5", "Rosenbrock23") !== nothing
        @test PyBridge.make_alg("AutoVern7", "Rodas5P") !== nothing
        @test_throws ArgumentError PyBridge.make_alg("SOSRI")
        for s in ("GaussAdjoint", "InterpolatingAdjoint", "QuadratureAdjoint", "BacksolveAdjoint")
            @test PyBridge.make_sensealg(s) !== nothing
        end
    end

    @testset "exp decay, n × m layout, trace, stats" begin
        u0 = [1.0 2.0; 3.0 4.0]
        ts = collect(0.0:0.25:1.0)
        res = solve_decay("Tsit5"; u0, ts)
        @test res.retcode == "Success"
        @test size(res.ys) == (2, 2, length(ts))
        for (j, t) in enumerate(ts)
            @test res.ys[:, :, j] ≈ u0 .* exp(-0.7t) rtol = 1e-6
        end
        @test length(res.trace_t) == res.naccept
        @test all(res.trace_eest .<= 1)
        @test all(isnan, res.trace_stiffness)        # not a composite method
        @test res.trace_t[end] ≈ 1.0
        @test sum(res.trace_dt) ≈ 1.0
        back = solve_decay("Tsit5"; u0, ts = reverse(ts))     # integrating backwards in time
        @test back.ys[:, :, end] ≈ u0 .* exp(0.7) rtol = 1e-6
    end

    @testset "stiff methods use the Python Jacobian" begin
        for alg in ("Rosenbrock23", "Rodas5P", "KenCarp4")
            res = solve_decay(alg; u0 = reshape([1.0, 2.0], 1, 2), implicit = true)  # blocks of n = 1
            @test res.retcode == "Success"
            @test res.ys[1, :, end] ≈ [1.0, 2.0] .* exp(-0.7) rtol = 1e-4
            @test res.njacs > 0
        end
        res = solve_decay("AutoTsit5"; stiff = "Rosenbrock23", u0 = reshape([1.0], 1, 1), implicit = true)
        @test res.retcode == "Success"
        @test all(isfinite, res.trace_stiffness)     # eigen_est of the composite method
    end

    @testset "failure keeps earlier values, NaN after" begin
        res = solve_decay("Tsit5"; maxiters = 3, dtmax = 0.01)
        @test res.retcode == "MaxIters"
        @test all(isfinite, res.ys[:, :, 1])
        @test all(isnan, res.ys[:, :, end])
    end

    @testset "dense output" begin
        res = solve_decay("Tsit5"; dense = true)
        tq = [0.1, 0.9, 5.0]
        out = zeros(2, 2, 3)
        GC.@preserve tq out PyBridge.interpolate!(res, addr(tq), 3, addr(out))
        @test out[:, :, 1] ≈ [1.0 2.0; 3.0 4.0] .* exp(-0.07) rtol = 1e-6
        @test all(isnan, out[:, :, 3])
    end

    @testset "adjoint with Python VJPs" begin
        θ = 0.7
        u0 = reshape([1.5], 1, 1)
        ts = collect(0.0:0.5:2.0)
        res = solve_decay("Tsit5"; θ, u0, ts, dense = true)
        G = ones(1, 1, length(ts))                   # L = Σ_j u(t_j)
        for alg in ("GaussAdjoint", "InterpolatingAdjoint", "QuadratureAdjoint")
            g = GC.@preserve G PyBridge.adjoint(res, addr(G), alg; reltol = 1e-10, abstol = 1e-12)
            @test g.du0[1] ≈ sum(exp.(-θ .* ts)) rtol = 1e-5            # ∂L/∂u0
            @test g.dp[1] ≈ -sum(ts .* 1.5 .* exp.(-θ .* ts)) rtol = 1e-5  # ∂L/∂θ
        end
    end
end
