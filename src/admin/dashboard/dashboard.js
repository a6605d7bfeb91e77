async function tick(){const r=await fetch("/api/status");document.getElementById("status").textContent=JSON.stringify(await r.json(),null,2);}
tick();setInterval(tick,2000);
