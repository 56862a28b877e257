#!/bin/bash
for i in 1 2; do
/tmp/oldtarget/release/storaged-bench --workloads tls --out /tmp/b16/tls-old-$i > /tmp/b16/tls-old-$i.log 2>&1
/work/main/target/release/storaged-bench --workloads tls --out /tmp/b16/tls-new-$i > /tmp/b16/tls-new-$i.log 2>&1
done
echo done > /tmp/b16/TLSDONE
