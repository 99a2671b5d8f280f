import collections, sys, warnings, torch, pybridge as pb
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).double().cuda()
f = lambda t, y: net(y)
y0 = torch.randn(8, 4, dtype=torch.float64, device="cuda")
t = torch.linspace(0, 2, 6, dtype=torch.float64, device="cuda")
for batch in ("independent", "lockstep"):
    for dense in (False, True):
        prob = pb.ODEProblem(f, y0, t)
        pb.solve(prob, pb.Tsit5(), rtol=1e-8, atol=1e-10, batch=batch)  # warm up
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            sol = pb.solve(prob, pb.Tsit5(), rtol=1e-8, atol=1e-10, batch=batch, dense=dense)
            if dense:
                sol(torch.linspace(0, 2, 11, dtype=torch.float64, device="cuda"))
            torch.cuda.set_sync_debug_mode("default")
        iters = int((sol.stats.naccept + sol.stats.nreject).max())
        where = collections.Counter()
        import traceback
        for w in caught:
            where[(w.filename.split("/")[-1], w.lineno)] += 1
        print(f"{batch} dense={dense}: {len(caught)} sync warnings, {iters} iterations; by location: {dict(where)}")
        if caught: print("   msg:", str(caught[0].message)[:150])
