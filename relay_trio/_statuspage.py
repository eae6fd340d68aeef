"""The small live status page served at ``GET /``: no build step, no external assets."""

from typing import Final

STATUS_PAGE: Final = b"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>relay-trio</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222;background:#fafafa}
h1{font-size:1.4em}table{border-collapse:collapse}td{padding:2px 12px 2px 0}
#tail{font:12px monospace;background:#fff;border:1px solid #ddd;padding:8px;height:24em;overflow:auto}
.t-drops{color:#b35900}.t-deadletter{color:#b00}.t-acks{color:#060}.t-system{color:#00a}
</style></head><body>
<h1>relay-trio</h1>
<p id="state">connecting&hellip;</p>
<table id="counters"></table>
<h2>Live events</h2>
<div id="tail"></div>
<script>
const tail=document.getElementById('tail'),state=document.getElementById('state');
function row(k,v){return '<tr><td>'+k+'</td><td>'+v+'</td></tr>';}
async function refresh(){
  try{const r=await fetch('/v1/status');const s=await r.json();
    let h='';for(const [k,v] of Object.entries(s.counters||{}))h+=row(k,v);
    for(const [k,v] of Object.entries(s.gauges||{}))h+=row(k,v);
    document.getElementById('counters').innerHTML=h;}catch(e){}
}
refresh();setInterval(refresh,2000);
const es=new EventSource('/v1/events/stream');
es.onopen=()=>{state.textContent='live';};
es.onerror=()=>{state.textContent='reconnecting';};
for(const t of ['reports','acks','drops','deadletter','system','gap','overflow']){
  es.addEventListener(t,(ev)=>{const d=document.createElement('div');d.className='t-'+t;
    d.textContent=t+' '+ev.data;tail.prepend(d);while(tail.childNodes.length>200)tail.lastChild.remove();});
}
</script></body></html>
"""
