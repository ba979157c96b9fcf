-- flower.dist in a plain process (no launcher): rank 0 of 1, collectives leave values alone, MPI is
-- never started, and train.fit{distributed = true} is the ordinary loop. The multi-rank behaviour is
-- tested under mpirun by tests/sh/test_dist.sh and tests/sh/test_dist_train.sh.
local flower = require 'flower'
local T = require 'flower.test'
local dist = flower.dist

T.test('one rank without a launcher', function()
  T.eq(dist.rank(), 0); T.eq(dist.size(), 1); T.eq(dist.local_rank(), 0); T.eq(dist.is_main(), true)
  T.eq(dist.wanted(nil), false); T.eq(dist.wanted(true), true); T.eq(dist.wanted(false), false)
end)

T.test('collectives on one rank', function()
  local t = flower.tensor({ 1, 2 })
  dist.barrier()
  T.check(dist.allreduce(t, 'mean') == t)
  dist.broadcast(t, 0)
  T.eq(t:sum():item(), 3)
  local g = dist.all_gather(t)
  T.eq(g:sum():item(), 3)
  g:fill(0)
  T.eq(t:sum():item(), 3, 'all_gather returns a copy')
  T.eq(dist.allreduce_numbers({ 4, 5 })[2], 5)
end)

T.test('wrong use is refused with a message', function()
  local ok, err = pcall(dist.broadcast, flower.zeros(2), 1)
  T.check(not ok and err:find('root must be a rank 0..0, got 1', 1, true), err)
  ok, err = pcall(dist.allreduce, flower.zeros(2), 'avg')
  T.check(not ok and err:find("op must be 'sum', 'mean', 'max' or 'min', got 'avg'", 1, true), err)
  ok, err = pcall(dist.all_gather, 3)
  T.check(not ok and err:find('expected a tensor', 1, true), err)
end)

T.test('distributed = true on one rank is the ordinary loop (same weights, same history)', function()
  local hd, hp = T.fit_distributed_and_plain(40, 1e-6, { valid = true })
  T.near(hd.rows[2].val_loss, hp.rows[2].val_loss, 1e-6)
end)

T.test('dist.resume_step converts a mid-epoch step between rank counts', function()
  T.eq(dist.resume_step(6, 2, 1), 12)
  T.eq(dist.resume_step(6, 1, 2), 3)
  T.eq(dist.resume_step(0, 2, 1), 0)
  local ok, err = pcall(dist.resume_step, 3, 1, 2, 'last.h5')
  T.check(not ok and err:find('last.h5 was written mid-epoch by 1 rank(s) after 3 batches', 1, true), err)
end)

T.test('dist.shard: batch b to rank (b-1) % size, an empty step at the end', function()
  local loader = setmetatable({}, { __len = function() return 5 end })
  function loader.epoch() local i = 0 return function() i = i + 1 if i <= 5 then return { n = 1, id = i } end end end
  local got = {}
  for b in dist.shard(loader, 1, 1, 2) do got[#got + 1] = b.id or 'none' end
  T.eq(table.concat(got, ','), '2,4,none')
  got = {}
  for b in dist.shard(loader, 1, 0, 2) do got[#got + 1] = b.id or 'none' end
  T.eq(table.concat(got, ','), '1,3,5')
end)

T.test('Loader:epoch_shard: the shards interleaved are the epoch, batch for batch (pixels, indices)', function()
  local F = dofile('tests/lua/exp_fixture.lua')
  local data = require 'flower.data'
  local ds = data.kaggle(F.flowers('export', 3, 8, 5))
  for _, workers in ipairs({ 0, 2 }) do
    local l = data.Loader { ds, batch_size = 5, shuffle = true, seed = 7, transform = 'train', size = 24,
                            workers = workers, warn = false }
    local whole = {}
    for b in l:epoch(2) do whole[#whole + 1] = b end
    T.eq(#whole, 5)                                       -- 24 images: 4 of 5 and one of 4
    for rank = 0, 2 do
      local k = 0
      for b in l:epoch_shard(2, rank, 3) do
        k = k + 1
        local w = whole[(k - 1) * 3 + rank + 1]
        T.eq(table.concat(b.index, ','), table.concat(w.index, ','), 'indices of shard ' .. rank .. ' batch ' .. k)
        T.eq((b.x - w.x):abs():max():item(), 0, 'pixels')
      end
      T.eq(k, rank < 2 and 2 or 1, 'batches of shard ' .. rank)
    end
    local ok, err = pcall(function() for _ in l:epoch_shard(1, 3, 3) do end end)
    T.check(not ok and err:find('expected 0 <= rank < size', 1, true), err)
  end
end)

T.done()
