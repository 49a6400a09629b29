import re, statistics as st, sys
lines = open(sys.argv[1]).read().split('\n')
sec = None; data = {}
for l in lines:
    if l.startswith('=== N='): sec = l.split()[1]; data[sec] = []; continue
    if l.startswith('=== end'): sec = None; continue
    if sec and l.startswith('TRACE'):
        c = int(l.split()[1][1:]); nums = [int(x) for x in re.findall(r'(?:gap|q|sec0|loops|turn|tail|epi) (-?\d+)', l)]
        n = int(re.search(r' n (\d+)', l).group(1))
        data[sec].append((c, n, nums))
names = ['gap', 'start->q', 'q->sec0', 'loops', 'turn', 'tail', 'epi']
for sec, rows in data.items():
    print(sec, 'rows', len(rows))
    for c in (0, 1):
        r = [x[2] for x in rows if x[0] == c][1:]
        if not r: continue
        print(f' consumer {c}: ' + ' | '.join(f'{nm} {st.median(v[i] for v in r):.0f}' for i, nm in enumerate(names)) + f' | n={rows[0][1]} (cycles, median of {len(r)})')
