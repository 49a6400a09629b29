import heapq
def sim(order, sms=132, over=2.0):
    h = [(0.0, i) for i in range(sms)]
    for dur in order:
        t, i = heapq.heappop(h)
        heapq.heappush(h, (t + dur + over, i))
    ends = [t for t, _ in h]
    total = sum(d + over for d in order)
    return max(ends), total / sms
for mb, heads in ((128, 128), (64, 128), (16, 128), (128, 32)):
    cur = [(mb - x) for bh in range(heads) for x in range(mb)]
    res = {"head-major (now)": cur}
    for S in (4, 8, 16):
        o = []
        for s0 in range(0, heads, S):
            hs = range(s0, min(heads, s0 + S))
            o += [(mb - x) for x in range(mb) for bh in hs]
        res[f"sections of {S}, longest first"] = o
    for k, o in res.items():
        mk, ideal = sim(o)
        print(f"mb={mb} heads={heads} {k}: makespan {mk:.0f} ideal {ideal:.0f} (+{(mk / ideal - 1) * 100:.2f}%)")
print("---")
for mb, S in ((16, 48), (16, 24), (64, 12), (128, 6), (32, 24)):
    heads = 128
    o = []
    for s0 in range(0, heads, S):
        hs = range(s0, min(heads, s0 + S))
        o += [(mb - x) for x in range(mb) for bh in hs]
    cur = [(mb - x) for bh in range(heads) for x in range(mb)]
    a, i = sim(o); b, _ = sim(cur)
    print(f"mb={mb} S={S}: +{(a / i - 1) * 100:.2f}% (now +{(b / i - 1) * 100:.2f}%)")
