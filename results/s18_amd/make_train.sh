#!/bin/bash
cd /work/main
echo "start $(date -u) commit $(git rev-parse --short HEAD)"
( time make train ) 
echo "end $(date -u) rc $?"
