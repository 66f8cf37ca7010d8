//+------------------------------------------------------------------+
//| Session.mqh - the EA's session state for the dynamic_core bridge   |
//|                                                                    |
//|   CDcClock       UTC wall clock in milliseconds                    |
//|   DcNewEpoch     a random session epoch in [1, 2^63-1]             |
//|   CDcSeqTracker  per-epoch sequence tracking, 1024-message window  |
//|   CDcOrderTable  client_order_id -> first ack + current report:    |
//|                  the idempotency store, bounded, persisted in an   |
//|                  append-only file under MQL5/Files (compacted at   |
//|                  start and when it grows), so that a restarted EA  |
//|                  never places an order twice                       |
//+------------------------------------------------------------------+
#ifndef DYNAMIC_CORE_SESSION_MQH
#define DYNAMIC_CORE_SESSION_MQH

#include "Protocol.mqh"

#define DC_SEQ_WINDOW 1024

//+------------------------------------------------------------------+
//| 64-bit mixing (constants below 2^63 so that they are plain long    |
//| literals); wraps modulo 2^64 like any ulong arithmetic             |
//+------------------------------------------------------------------+
ulong DcMix64(ulong x)
  {
   x^=(x>>33);
   x*=(ulong)0x2545F4914F6CDD1D;
   x^=(x>>29);
   x*=(ulong)0x5851F42D4C957F2D;
   x^=(x>>32);
   return(x);
  }
//+------------------------------------------------------------------+
//| A fresh session epoch: random in [1, 2^63-1]                       |
//+------------------------------------------------------------------+
long DcNewEpoch(void)
  {
   ulong h=(ulong)GetMicrosecondCount();
   h=DcMix64(h^((ulong)TimeLocal()<<20));
   h=DcMix64(h^(ulong)ChartID());
   h=DcMix64(h^(ulong)AccountInfoInteger(ACCOUNT_LOGIN));
   h=DcMix64(h^(ulong)GetTickCount());
   for(int k=0; k<4; k++)
      h=DcMix64(h^((ulong)MathRand()<<(k*15)));
   long e=(long)(h&(ulong)LONG_MAX);
   return(e==0 ? 1 : e);
  }
//+------------------------------------------------------------------+
//| UTC wall clock, ms since 1970-01-01.                               |
//| TimeGMT() has whole seconds; GetMicrosecondCount() interpolates.   |
//| Tick() (called from every timer event) anchors the clock to the    |
//| moment TimeGMT() steps to a new second, and re-anchors whenever    |
//| the estimate leaves the second TimeGMT() reports (clock changes).  |
//+------------------------------------------------------------------+
class CDcClock
  {
private:
   long              m_anchor_ms;
   ulong             m_anchor_us;
   long              m_last_sec;
   bool              m_fine;
public:
                     CDcClock(void) : m_anchor_ms(0),m_anchor_us(0),m_last_sec(0),m_fine(false) {}
   void              Init(void)
     {
      m_last_sec=(long)TimeGMT();
      m_anchor_ms=m_last_sec*1000;
      m_anchor_us=GetMicrosecondCount();
      m_fine=false;
     }
   long              Now(void) const
     {
      return(m_anchor_ms+(long)((GetMicrosecondCount()-m_anchor_us)/1000));
     }
   void              Tick(void)
     {
      long sec=(long)TimeGMT();
      if(sec==m_last_sec)
         return;
      bool first_step=(!m_fine && sec==m_last_sec+1);
      m_last_sec=sec;
      long boundary=sec*1000;
      long now=Now();
      if(first_step || now<boundary || now>=boundary+1000)
        {
         m_anchor_ms=boundary;
         m_anchor_us=GetMicrosecondCount();
         if(first_step)
            m_fine=true;
        }
     }
  };
//+------------------------------------------------------------------+
//| Sequence numbers of the peer's current epoch (docs section 3)      |
//+------------------------------------------------------------------+
#define DC_SEQ_FIRST     0
#define DC_SEQ_OK        1
#define DC_SEQ_GAP       2
#define DC_SEQ_REORDERED 3
#define DC_SEQ_DUPLICATE 4
#define DC_SEQ_JUMP      5   // DC_SEQ_WINDOW or more away (ahead or behind): processed, the window restarts there

class CDcSeqTracker
  {
private:
   long              m_hi;
   uchar             m_seen[DC_SEQ_WINDOW];
   void              Clear(void) { ArrayInitialize(m_seen,0); }
   int               Slot(const long seq) const { return((int)(seq%DC_SEQ_WINDOW)); }
public:
   long              gaps;
   long              reordered;
   long              duplicates;
   long              jumps;
                     CDcSeqTracker(void) : m_hi(0),gaps(0),reordered(0),duplicates(0),jumps(0) { Clear(); }
   long              Highest(void) const { return(m_hi); }
   void              Reset(void) { m_hi=0; Clear(); }
   int               Check(const long seq)
     {
      if(m_hi==0)
        {
         Clear();
         m_hi=seq;
         m_seen[Slot(seq)]=1;
         return(DC_SEQ_FIRST);
        }
      //--- too far from the window to be judged by it (a bad number, or a long loss): move the
      //--- window, so one bad number never makes later messages look old
      if(seq-m_hi>=DC_SEQ_WINDOW || m_hi-seq>=DC_SEQ_WINDOW)
        {
         Clear();
         m_hi=seq;
         m_seen[Slot(seq)]=1;
         jumps++;
         return(DC_SEQ_JUMP);
        }
      if(seq>m_hi)
        {
         long d=seq-m_hi;
         for(long s=m_hi+1; s<=seq; s++)
            m_seen[Slot(s)]=0;
         m_seen[Slot(seq)]=1;
         m_hi=seq;
         if(d>1)
           {
            gaps+=d-1;
            return(DC_SEQ_GAP);
           }
         return(DC_SEQ_OK);
        }
      if(m_seen[Slot(seq)]!=0)
        {
         duplicates++;
         return(DC_SEQ_DUPLICATE);
        }
      m_seen[Slot(seq)]=1;
      reordered++;
      return(DC_SEQ_REORDERED);
     }
  };
//+------------------------------------------------------------------+
//| What the EA remembers of one client_order_id                       |
//+------------------------------------------------------------------+
class CDcOrderRec
  {
public:
   string            coid;
   string            symbol;
   string            side;
   string            order_type;
   double            volume;          // lots asked for
   long              valid_until;     // ms UTC
   long              magic;
   bool              accepted;        // the first ack
   string            ack_reason;
   long              ticket;          // MT5 order ticket (0: none)
   string            status;          // "" (accepted, outcome not known yet) or an exec_report status
   double            price;           // average fill price
   double            filled;          // lots filled
   double            commission;
   long              fill_ts;         // ms UTC of the last fill
   string            reason;
   long              created_ms;
                     CDcOrderRec(void) : volume(0.0),valid_until(0),magic(0),accepted(false),ticket(0),
                                         price(0.0),filled(0.0),commission(0.0),fill_ts(0),created_ms(0) {}
  };
//+------------------------------------------------------------------+
bool DcIsFinal(const string status)
  {
   return(status=="filled" || status=="rejected" || status=="expired" || status=="cancelled");
  }
//+------------------------------------------------------------------+
bool DcIsValidId(const string s)
  {
   int n=StringLen(s);
   if(n<1 || n>DC_MAX_ID)
      return(false);
   for(int k=0; k<n; k++)
      if(!DcIsIdChar(StringGetCharacter(s,k)))
         return(false);
   return(true);
  }
//+------------------------------------------------------------------+
string DcFileField(string s)
  {
   StringReplace(s,"\t"," ");
   StringReplace(s,"\r"," ");
   StringReplace(s,"\n"," ");
   return(s);
  }
//+------------------------------------------------------------------+
//| The idempotency store                                              |
//+------------------------------------------------------------------+
class CDcOrderTable
  {
private:
   CDcOrderRec      *m_recs[];
   int               m_count;
   int               m_max;
   int               m_slot[];        // open addressing: coid -> index in m_recs, -1 empty
   int               m_mask;
   string            m_path;
   int               m_file;
   int               m_appended;

   uint              Hash(const string s) const;
   void              Reindex(void);
   void              IndexInsert(const int i);
   string            Line(const CDcOrderRec *r) const;
   bool              ParseLine(const string line,CDcOrderRec *r) const;
   bool              EvictOldest(void);
   void              OpenAppend(void);

public:
                     CDcOrderTable(void) : m_count(0),m_max(20000),m_mask(0),m_file(INVALID_HANDLE),m_appended(0) {}
                    ~CDcOrderTable(void) { Close(); Clear(); }
   bool              Open(const string path,const int max_records);
   void              Close(void);
   void              Clear(void);
   int               Count(void) const { return(m_count); }
   CDcOrderRec      *At(const int i)
     {
      if(i<0 || i>=m_count)
         return(NULL);
      return(m_recs[i]);
     }
   CDcOrderRec      *Find(const string coid);
   CDcOrderRec      *FindByTicket(const long ticket);
   //--- a new record for coid (owned by the table); NULL when the table is full of open orders
   CDcOrderRec      *Create(const string coid,const long now_ms);
   //--- persist r after a decision (one appended line, flushed)
   void              Save(const CDcOrderRec *r);
   void              Compact(void);
  };
//+------------------------------------------------------------------+
uint CDcOrderTable::Hash(const string s) const
  {
   uint h=(uint)2166136261;
   int n=StringLen(s);
   for(int k=0; k<n; k++)
      h=(h^(uint)StringGetCharacter(s,k))*16777619;
   return(h);
  }
//+------------------------------------------------------------------+
void CDcOrderTable::Reindex(void)
  {
   int cap=64;
   while(cap<2*(m_count+1))
      cap*=2;
   ArrayResize(m_slot,cap);
   ArrayInitialize(m_slot,-1);
   m_mask=cap-1;
   for(int i=0; i<m_count; i++)
      IndexInsert(i);
  }
//+------------------------------------------------------------------+
void CDcOrderTable::IndexInsert(const int i)
  {
   int h=(int)(Hash(m_recs[i].coid)&(uint)m_mask);
   while(m_slot[h]>=0)
      h=(h+1)&m_mask;
   m_slot[h]=i;
  }
//+------------------------------------------------------------------+
CDcOrderRec *CDcOrderTable::Find(const string coid)
  {
   if(m_mask==0)
      return(NULL);
   int h=(int)(Hash(coid)&(uint)m_mask);
   while(m_slot[h]>=0)
     {
      CDcOrderRec *r=m_recs[m_slot[h]];
      if(r.coid==coid)
         return(r);
      h=(h+1)&m_mask;
     }
   return(NULL);
  }
//+------------------------------------------------------------------+
CDcOrderRec *CDcOrderTable::FindByTicket(const long ticket)
  {
   if(ticket<=0)
      return(NULL);
   for(int i=m_count-1; i>=0; i--)
      if(m_recs[i].ticket==ticket)
         return(m_recs[i]);
   return(NULL);
  }
//+------------------------------------------------------------------+
//| Drop the oldest tenth of the final records (never an open one)     |
//+------------------------------------------------------------------+
bool CDcOrderTable::EvictOldest(void)
  {
   int quota=MathMax(1,m_max/10);
   int w=0;
   int dropped=0;
   for(int i=0; i<m_count; i++)
     {
      if(dropped<quota && DcIsFinal(m_recs[i].status))
        {
         delete m_recs[i];
         dropped++;
         continue;
        }
      m_recs[w++]=m_recs[i];
     }
   m_count=w;
   ArrayResize(m_recs,m_count,1024);
   Reindex();
   if(dropped>0)
      PrintFormat("DynamicCoreEA: order table full (%d): forgot the %d oldest settled orders",m_max,dropped);
   return(dropped>0);
  }
//+------------------------------------------------------------------+
CDcOrderRec *CDcOrderTable::Create(const string coid,const long now_ms)
  {
   if(m_count>=m_max && !EvictOldest())
      return(NULL);
   CDcOrderRec *r=new CDcOrderRec();
   r.coid=coid;
   r.created_ms=now_ms;
   ArrayResize(m_recs,m_count+1,1024);
   m_recs[m_count]=r;
   m_count++;
   if(2*(m_count+1)>m_mask+1)
      Reindex();
   else
      IndexInsert(m_count-1);
   return(r);
  }
//+------------------------------------------------------------------+
void CDcOrderTable::Clear(void)
  {
   for(int i=0; i<m_count; i++)
      delete m_recs[i];
   m_count=0;
   ArrayFree(m_recs);
   Reindex();
  }
//+------------------------------------------------------------------+
string CDcOrderTable::Line(const CDcOrderRec *r) const
  {
   return("R\t"+DcFileField(r.coid)+"\t"+DcFileField(r.symbol)+"\t"+r.side+"\t"+r.order_type+"\t"+
          DcJsonNumber(r.volume)+"\t"+IntegerToString(r.valid_until)+"\t"+IntegerToString(r.magic)+"\t"+
          (r.accepted ? "1" : "0")+"\t"+DcFileField(r.ack_reason)+"\t"+IntegerToString(r.ticket)+"\t"+
          r.status+"\t"+DcJsonNumber(r.price)+"\t"+DcJsonNumber(r.filled)+"\t"+DcJsonNumber(r.commission)+"\t"+
          IntegerToString(r.fill_ts)+"\t"+DcFileField(r.reason)+"\t"+IntegerToString(r.created_ms)+"\r\n");
  }
//+------------------------------------------------------------------+
bool CDcOrderTable::ParseLine(const string line,CDcOrderRec *r) const
  {
   string f[];
   if(StringSplit(line,'\t',f)!=18 || f[0]!="R" || !DcIsValidId(f[1]))
      return(false);
   r.coid=f[1];
   r.symbol=f[2];
   r.side=f[3];
   r.order_type=f[4];
   r.volume=StringToDouble(f[5]);
   r.valid_until=StringToInteger(f[6]);
   r.magic=StringToInteger(f[7]);
   r.accepted=(f[8]=="1");
   r.ack_reason=f[9];
   r.ticket=StringToInteger(f[10]);
   r.status=f[11];
   r.price=StringToDouble(f[12]);
   r.filled=StringToDouble(f[13]);
   r.commission=StringToDouble(f[14]);
   r.fill_ts=StringToInteger(f[15]);
   r.reason=f[16];
   r.created_ms=StringToInteger(f[17]);
   return(true);
  }
//+------------------------------------------------------------------+
//| Load the file (last line of an id wins), keep at most max_records, |
//| rewrite it compacted and keep it open for appending                |
//+------------------------------------------------------------------+
bool CDcOrderTable::Open(const string path,const int max_records)
  {
   Close();
   Clear();
   m_path=path;
   m_max=MathMax(100,max_records);
   int loaded=0;
   int bad=0;
   if(FileIsExist(m_path))
     {
      int h=FileOpen(m_path,FILE_READ|FILE_TXT|FILE_UNICODE|FILE_SHARE_READ);
      if(h==INVALID_HANDLE)
        {
         PrintFormat("DynamicCoreEA: cannot read %s (error %d)",m_path,GetLastError());
         return(false);
        }
      CDcOrderRec tmp;
      while(!FileIsEnding(h) && !IsStopped())
        {
         string line=FileReadString(h);
         if(line=="" || StringSubstr(line,0,2)!="R\t")
            continue;
         if(!ParseLine(line,GetPointer(tmp)))
           {
            bad++;
            continue;
           }
         CDcOrderRec *r=Find(tmp.coid);
         if(r==NULL)
           {
            r=new CDcOrderRec();
            ArrayResize(m_recs,m_count+1,1024);
            m_recs[m_count]=r;
            m_count++;
            if(2*(m_count+1)>m_mask+1)
               Reindex();
            else
               IndexInsert(m_count-1);
           }
         ParseLine(line,r);
         loaded++;
        }
      FileClose(h);
     }
   while(m_count>m_max && EvictOldest())
     {
     }
   PrintFormat("DynamicCoreEA: %d orders remembered from %s (%d lines, %d unreadable)",m_count,m_path,loaded,bad);
   Compact();
   return(true);
  }
//+------------------------------------------------------------------+
void CDcOrderTable::OpenAppend(void)
  {
   m_file=FileOpen(m_path,FILE_READ|FILE_WRITE|FILE_TXT|FILE_UNICODE|FILE_SHARE_READ);
   if(m_file==INVALID_HANDLE)
     {
      PrintFormat("DynamicCoreEA: cannot open %s for writing (error %d): decisions are NOT persisted",
                  m_path,GetLastError());
      return;
     }
   FileSeek(m_file,0,SEEK_END);
  }
//+------------------------------------------------------------------+
//| Rewrite the file with one line per remembered order                |
//+------------------------------------------------------------------+
void CDcOrderTable::Compact(void)
  {
   if(m_path=="")
      return;
   if(m_file!=INVALID_HANDLE)
     {
      FileClose(m_file);
      m_file=INVALID_HANDLE;
     }
   string tmp=m_path+".tmp";
   int h=FileOpen(tmp,FILE_WRITE|FILE_TXT|FILE_UNICODE);
   if(h==INVALID_HANDLE)
     {
      PrintFormat("DynamicCoreEA: cannot write %s (error %d)",tmp,GetLastError());
      OpenAppend();
      return;
     }
   FileWriteString(h,"DCEA\t1\r\n");
   for(int i=0; i<m_count; i++)
      FileWriteString(h,Line(m_recs[i]));
   FileClose(h);
   if(!FileMove(tmp,0,m_path,FILE_REWRITE))
      PrintFormat("DynamicCoreEA: cannot replace %s (error %d)",m_path,GetLastError());
   m_appended=0;
   OpenAppend();
  }
//+------------------------------------------------------------------+
void CDcOrderTable::Save(const CDcOrderRec *r)
  {
   if(m_file==INVALID_HANDLE)
      return;
   FileWriteString(m_file,Line(r));
   FileFlush(m_file);
   m_appended++;
   if(m_appended>4*m_count+1000)
      Compact();
  }
//+------------------------------------------------------------------+
void CDcOrderTable::Close(void)
  {
   if(m_file!=INVALID_HANDLE)
     {
      FileClose(m_file);
      m_file=INVALID_HANDLE;
     }
  }
#endif // DYNAMIC_CORE_SESSION_MQH
//+------------------------------------------------------------------+
