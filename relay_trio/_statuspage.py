"""The small live status page served at ``GET /``: no build step, no external assets."""

from typing import Final

STATUS_PAGE: Final = b"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>relay-trio</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222;background:#fafafa}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.2em}
.grid{display:flex;flex-wrap:wrap;gap:6px}
.c{background:#fff;border:1px solid #ddd;border-radius:4px;padding:4px 8px;min-width:11em}
.c b{display:block;font-size:1.2em}.c span{color:#666;font-size:.85em}
#tail{font:12px monospace;background:#fff;border:1px solid #ddd;padding:8px;height:24em;overflow:auto}
.t-drops{color:#b35900}.t-deadletter{color:#b00}.t-acks{color:#060}.t-system{color:#00a}
</style></head><body>
<h1>relay-trio</h1>
<p id="state">connecting&hellip;</p>
<h2>Live events</h2>
<div id="tail"></div>
<h2>Gauges</h2><div class="grid" id="gauges"></div>
<h2>Counters</h2><div class="grid" id="counters"></div>
<script>
const tail=document.getElementById('tail'),state=document.getElementById('state');
function cell(k,v){const d=document.createElement('div');d.className='c';
  const b=document.createElement('b');b.textContent=v;const s=document.createElement('span');s.textContent=k;
  d.append(b,s);return d;}
function fill(id,obj){document.getElementById(id).replaceChildren(...Object.entries(obj||{}).map(([k,v])=>cell(k,v)));}
async function refresh(){
  try{const r=await fetch('/v1/status');const s=await r.json();
    fill('gauges',s.gauges);fill('counters',s.counters);
    state.textContent=(s.ready?'live':'draining')+' - up '+Math.round(s.uptime_seconds)+' s';}catch(e){state.textContent='status unavailable';}
}
function follow(lastId){
  // Start with the last 50 events so the page is not empty on a quiet relay.
  const es=new EventSource('/v1/events/stream?last_event_id='+Math.max(0,lastId-50));
  es.onerror=()=>{state.textContent='stream reconnecting';};
  for(const t of ['reports','acks','drops','deadletter','system','gap','overflow','shutdown']){
    es.addEventListener(t,(ev)=>{const d=document.createElement('div');d.className='t-'+t;
      let e={};try{e=JSON.parse(ev.data);}catch(_){}
      d.textContent=(e.at?e.at.slice(11,23)+' ':'')+t+' '+JSON.stringify(e.data!==undefined?e.data:e);tail.prepend(d);while(tail.childNodes.length>200)tail.lastChild.remove();});
  }
}
fetch('/v1/status').then(r=>r.json()).then(s=>follow((s.events||{}).last_id||0),()=>follow(0));
refresh();setInterval(refresh,2000);
</script></body></html>
"""
